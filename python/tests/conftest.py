import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small corpus directory with the layout of the real one."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines_a = [f"Line {i} of the first book, with some words: é, ü, — and “quotes”.\n" for i in range(300)]
    lines_b = [f"Verse {i}: and the earth was without form, and void.\n" for i in range(200)]
    (corpus / "b_second.txt").write_text("".join(lines_b), encoding="utf-8")
    (corpus / "a_first.txt").write_text("".join(lines_a), encoding="utf-8")
    (corpus / "no_newline_end.txt").write_text("x" * 500 + "\n" + "tail without newline", encoding="utf-8")
    (corpus / "SOURCES.md").write_text("not a corpus file\n")
    return corpus
