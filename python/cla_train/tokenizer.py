"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained on the training split.

The saved ``tokenizer.json`` has:

* no normalizer (text is taken byte for byte),
* the ByteLevel pre-tokenizer (GPT-2 regex, ``add_prefix_space = false``) and ByteLevel
  decoder, so ``decode(encode(text)) == text`` for any UTF-8 text,
* special tokens ``<s>`` (id 0, BOS) and ``</s>`` (id 1, EOS), then the 256 byte symbols,
  then the merges,
* NO post-processor: encoding never adds BOS/EOS. Callers add BOS themselves where wanted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<s>"
EOS = "</s>"
DEFAULT_VOCAB = 4096
ASSET = Path(__file__).parent / "assets" / "tokenizer-bpe4096.json"


def text_chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of about ``size`` characters that end at a newline (the last may not)."""
    i, n = 0, len(text)
    while i < n:
        j = min(n, i + size)
        if j < n:
            k = text.find("\n", j)
            j = n if k < 0 else k + 1
        yield text[i:j]
        i = j


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: Path | str | None = None) -> Tokenizer:
    return Tokenizer.from_file(str(path or ASSET))


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError("tokenizer lacks <s> / </s>")
    return bos, eos


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return tok.encode(text, add_special_tokens=False).ids


def encode_large(tok: Tokenizer, text: str, dtype=np.uint16) -> np.ndarray:
    """Tokenizes a large text in parallel, in newline-ended pieces (used for training data;
    the validation text is always encoded in one piece, see evaluate.py)."""
    pieces = list(text_chunks(text))
    out = []
    for k in range(0, len(pieces), 256):
        for enc in tok.encode_batch(pieces[k : k + 256], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on train.txt.")
    ap.add_argument("--train-text", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    args = ap.parse_args(argv)
    text = args.train_text.read_bytes().decode("utf-8")
    tok = train_tokenizer(text_chunks(text), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    bos, eos = special_ids(tok)
    print(json.dumps({"vocab_size": tok.get_vocab_size(), "bos_token_id": bos, "eos_token_id": eos}))


if __name__ == "__main__":
    main()
