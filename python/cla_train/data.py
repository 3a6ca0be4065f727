"""Prepared data: the split, the tokenizer, the training token stream and its batch order.

``prepare_data(corpus, out)`` writes into ``out``:

* ``train.txt``, ``val.txt``, ``split.json``   (split.py's rule),
* ``tokenizer.json``                          (the packaged tokenizer unless one is given),
* ``train.u16``                               the training token stream, uint16 little endian:
  for every corpus file in split order, ``<s>`` followed by the tokens of that file's training
  part (each file's part is encoded in newline-ended pieces of about 64 KiB),
* ``val_ids.npy``                             int32 ids of the whole ``val.txt`` encoded in one
  piece, no special tokens (what the perplexity is computed on),
* ``data.json``                               sizes and hashes.

Batches: the stream is cut into ``(len - 1) // T`` chunks of T + 1 tokens at stride T
(chunk i covers tokens ``[i*T, i*T + T + 1)``; input = first T, target = last T). Each epoch
visits every chunk once in the order ``numpy.random.default_rng([seed, epoch]).permutation``;
batches take consecutive chunks of that order, epochs follow one another. The order thus
depends only on the seed, the context and the batch size, never on the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .split import split_corpus
from .tokenizer import ASSET, encode, encode_large, load_tokenizer, special_ids


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_data(corpus: Path, out: Path, tokenizer_path: Path | None = None, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = Path(tokenizer_path or ASSET)
    train, val, info = split_corpus(Path(corpus))
    key = {
        "train_sha256": hashlib.sha256(train).hexdigest(),
        "val_sha256": hashlib.sha256(val).hexdigest(),
        "tokenizer_sha256": _sha(tokenizer_path),
    }
    meta_path = out / "data.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in key.items()) and (out / "train.u16").exists():
            log(f"data: reusing {out}")
            return meta
    (out / "train.txt").write_bytes(train)
    (out / "val.txt").write_bytes(val)
    (out / "split.json").write_text(json.dumps({"files": info}, indent=2) + "\n")
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    tok = load_tokenizer(out / "tokenizer.json")
    if tok.get_vocab_size() > 65536:
        raise ValueError("train.u16 needs a vocabulary of at most 65536 tokens")
    bos, eos = special_ids(tok)
    parts, pos = [], 0
    for f in info:
        piece = train[pos : pos + f["cut"]]
        pos += f["bytes"]
        parts.append(np.array([bos], dtype=np.uint16))
        parts.append(encode_large(tok, piece.decode("utf-8")))
    stream = np.concatenate(parts)
    stream.astype("<u2").tofile(out / "train.u16")
    val_ids = np.asarray(encode(tok, val.decode("utf-8")), dtype=np.int32)
    np.save(out / "val_ids.npy", val_ids)
    meta = dict(
        key,
        train_bytes=len(train),
        val_bytes=len(val),
        train_tokens=int(stream.size),
        val_tokens=int(val_ids.size),
        vocab_size=tok.get_vocab_size(),
        bos_token_id=bos,
        eos_token_id=eos,
    )
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"data: {meta['train_tokens']} train tokens, {meta['val_tokens']} val tokens -> {out}")
    return meta


def load_train_tokens(data_dir: Path) -> np.ndarray:
    return np.fromfile(Path(data_dir) / "train.u16", dtype="<u2")


def load_val_ids(data_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(Path(data_dir) / "val_ids.npy").astype(np.int64))


class BatchOrder:
    """Deterministic batches of (input, target) windows; see the module docstring."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int, device: str | torch.device):
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.n_chunks = (tokens.size - 1) // context
        if self.n_chunks < batch_size:
            raise ValueError(f"only {self.n_chunks} chunks of {context + 1} tokens for a batch of {batch_size}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.offsets = torch.arange(context + 1, device=device)
        self.device = device
        self._epoch, self._order, self._pos = -1, None, 0

    def _next_epoch(self):
        self._epoch += 1
        perm = np.random.default_rng([self.seed, self._epoch]).permutation(self.n_chunks)
        self._order = torch.from_numpy(perm).to(self.device)
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = []
        need = self.batch_size
        while need > 0:
            if self._order is None or self._pos >= self.n_chunks:
                self._next_epoch()
            take = min(need, self.n_chunks - self._pos)
            picks.append(self._order[self._pos : self._pos + take])
            self._pos += take
            need -= take
        chunks = torch.cat(picks) if len(picks) > 1 else picks[0]
        idx = chunks[:, None] * self.context + self.offsets[None, :]
        window = self.tokens[idx]
        return window[:, :-1], window[:, 1:]

    @property
    def epochs_done(self) -> float:
        return self._epoch + self._pos / self.n_chunks

    def seek(self, n_batches: int) -> None:
        """Positions the order as if ``n_batches`` batches had been drawn (for resuming)."""
        consumed = n_batches * self.batch_size
        self._epoch = consumed // self.n_chunks - 1
        self._next_epoch()
        self._pos = consumed % self.n_chunks
