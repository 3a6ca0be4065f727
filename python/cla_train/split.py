"""Deterministic train/validation split of the corpus.

The rule (also in the README, so that any program can reproduce it byte for byte):

1. The corpus files are the regular files in the corpus directory whose names end in
   ``.txt``, taken in ascending byte order of their names (``sorted()`` of the names).
2. For a file of ``n`` bytes let ``target = n - (2 * n) // 100`` (integer division).
   The validation part starts at ``cut``: ``cut = target`` if ``target == 0`` or the byte at
   ``target - 1`` is a newline (``0x0A``); otherwise ``cut`` is one past the first newline at
   or after ``target``, or ``n`` if there is none. So validation starts at a line boundary.
3. ``train.txt`` is the concatenation of every file's bytes ``[0, cut)``, in file order;
   ``val.txt`` is the concatenation of every file's bytes ``[cut, n)``, in file order.
   Nothing is inserted between files and nothing is decoded or normalised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

VAL_PERCENT = 2


def corpus_files(corpus: Path) -> list[Path]:
    files = [p for p in Path(corpus).iterdir() if p.is_file() and p.name.endswith(".txt")]
    files.sort(key=lambda p: p.name.encode("utf-8"))
    if not files:
        raise FileNotFoundError(f"no *.txt files in {corpus}")
    return files


def cut_point(data: bytes, val_percent: int = VAL_PERCENT) -> int:
    n = len(data)
    target = n - (val_percent * n) // 100
    if target == 0 or data[target - 1] == 0x0A:
        return target
    j = data.find(b"\n", target)
    return n if j < 0 else j + 1


def split_corpus(corpus: Path, val_percent: int = VAL_PERCENT) -> tuple[bytes, bytes, list[dict]]:
    train, val, info = [], [], []
    for p in corpus_files(corpus):
        data = p.read_bytes()
        c = cut_point(data, val_percent)
        train.append(data[:c])
        val.append(data[c:])
        info.append({"file": p.name, "bytes": len(data), "cut": c, "val_bytes": len(data) - c})
    return b"".join(train), b"".join(val), info


def write_split(corpus: Path, out: Path, val_percent: int = VAL_PERCENT) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, info = split_corpus(corpus, val_percent)
    (out / "train.txt").write_bytes(train)
    (out / "val.txt").write_bytes(val)
    summary = {
        "rule": f"per *.txt file in sorted name order: last {val_percent}% of bytes, from a line start",
        "files": info,
        "train_bytes": len(train),
        "val_bytes": len(val),
        "train_sha256": hashlib.sha256(train).hexdigest(),
        "val_sha256": hashlib.sha256(val).hexdigest(),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write train.txt / val.txt from the corpus (deterministic).")
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--val-percent", type=int, default=VAL_PERCENT)
    args = ap.parse_args(argv)
    s = write_split(args.corpus, args.out, args.val_percent)
    print(json.dumps({k: s[k] for k in ("train_bytes", "val_bytes", "val_sha256")}, indent=2))


if __name__ == "__main__":
    main()
