import hashlib

import numpy as np

from cla_train.data import BatchOrder, prepare_data
from cla_train.split import cut_point, split_corpus, write_split
from cla_train.tokenizer import ASSET, encode, load_tokenizer, special_ids, text_chunks, train_tokenizer


def test_cut_point_rule():
    assert cut_point(b"") == 0
    data = b"".join(b"line %03d\n" % i for i in range(100))  # 900 bytes, 9 per line
    target = 900 - 18
    c = cut_point(data)
    assert c >= target and data[c - 1 : c] == b"\n"
    assert c - target < 9
    # Exactly on a boundary: no move.
    assert cut_point(b"a\n" * 50) == 98
    # No newline after the target: the whole file is training text.
    assert cut_point(b"\n" + b"x" * 99) == 100


def test_split_is_deterministic_disjoint_and_complete(tiny_corpus, tmp_path):
    s1 = write_split(tiny_corpus, tmp_path / "s1")
    write_split(tiny_corpus, tmp_path / "s2")
    for name in ("train.txt", "val.txt"):
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()
    assert [f["file"] for f in s1["files"]] == ["a_first.txt", "b_second.txt", "no_newline_end.txt"]
    train, val, info = split_corpus(tiny_corpus)
    # Reassemble every file from its two parts: nothing lost, nothing shared.
    tpos = vpos = 0
    for f in info:
        original = (tiny_corpus / f["file"]).read_bytes()
        tpart = train[tpos : tpos + f["cut"]]
        vpart = val[vpos : vpos + f["val_bytes"]]
        assert tpart + vpart == original
        if vpart:
            assert tpart.endswith(b"\n")
            assert len(vpart) <= len(original) * 2 // 100
        tpos += len(tpart)
        vpos += len(vpart)
    assert tpos == len(train) and vpos == len(val)
    assert s1["val_sha256"] == hashlib.sha256(val).hexdigest()
    assert len(val) > 0


def test_packaged_tokenizer_round_trips():
    tok = load_tokenizer(ASSET)
    assert tok.get_vocab_size() == 4096
    assert special_ids(tok) == (0, 1)
    samples = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n",
        "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nCRLF",
        "Unicode: é ü — “quotes” 你好 🙂 \u2581 <s> literal",
        "",
        "a",
    ]
    for s in samples:
        ids = encode(tok, s)
        assert tok.decode(ids, skip_special_tokens=False) == s
    # Nothing is added: no BOS/EOS from encoding.
    ids = encode(tok, "hello world")
    assert 0 not in ids and 1 not in ids
    assert tok.encode("hello world").ids == ids


def test_trained_tokenizer_round_trips(tiny_corpus, tmp_path):
    train, val, _ = split_corpus(tiny_corpus)
    tok = train_tokenizer(text_chunks(train.decode(), 500), vocab_size=300)
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    text = val.decode()
    assert tok.decode(encode(tok, text)) == text
    tok.save(str(tmp_path / "t.json"))
    assert load_tokenizer(tmp_path / "t.json").decode(encode(tok, text)) == text


def test_prepare_and_batch_order(tiny_corpus, tmp_path):
    meta = prepare_data(tiny_corpus, tmp_path / "data")
    tokens = np.fromfile(tmp_path / "data" / "train.u16", dtype="<u2")
    assert tokens.size == meta["train_tokens"] and tokens[0] == meta["bos_token_id"]
    assert (tokens == meta["bos_token_id"]).sum() == 3  # one BOS per corpus file
    val_ids = np.load(tmp_path / "data" / "val_ids.npy")
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert tok.decode(val_ids.tolist()) == (tmp_path / "data" / "val.txt").read_text()
    # Same seed -> same batches; each epoch covers every chunk once.
    a = BatchOrder(tokens, 16, 4, seed=3, device="cpu")
    b = BatchOrder(tokens, 16, 4, seed=3, device="cpu")
    c = BatchOrder(tokens, 16, 4, seed=4, device="cpu")
    xa, ya = a.next()
    xb, yb = b.next()
    xc, _ = c.next()
    assert (xa == xb).all() and not (xa == xc).all()
    assert (xa[:, 1:] == ya[:, :-1]).all()
    # Resuming (seek) gives the same stream as drawing.
    d = BatchOrder(tokens, 16, 4, seed=3, device="cpu")
    for _ in range(a.n_chunks // 4 + 3):
        a.next()
    d.seek(a.n_chunks // 4 + 4)
    assert (a.next()[0] == d.next()[0]).all()
