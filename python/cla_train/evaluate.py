"""Validation perplexity, defined exactly as the engine's ``cla eval --context T --stride T``.

1. Tokenize the whole validation text (``val.txt``) ONCE, as one string, with the model's
   ``tokenizer.json``; no BOS or any other special token is added.
2. Cut the ids into consecutive, non-overlapping windows of T tokens: ``ids[0:T]``,
   ``ids[T:2T]``, ... The last window may be shorter; windows of fewer than 2 tokens are
   dropped.
3. Each window is run on its own (no state carried between windows). In a window of n
   tokens, positions 0..n-2 predict the next token: NLL_j = -log softmax(logits_j)[ids_{j+1}].
   So n - 1 tokens are scored per window; the first token of each window is not scored.
4. ppl = exp(sum of all NLL / number of scored tokens), with the logits in float32 (no
   autocast) and the sum accumulated in float64.

``python -m cla_train.evaluate --model DIR --val-text val.txt --context 256`` prints it for an
exported model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    out = []
    for s in range(0, n_tokens, context):
        e = min(n_tokens, s + context)
        if e - s >= 2:
            out.append((s, e))
    return out


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, context: int, batch_size: int = 16, max_windows: int | None = None,
               autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Sum of NLL (float64) and the number of scored tokens over the windows of ``ids``."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    wins = windows(ids.numel(), context)
    if max_windows is not None:
        wins = wins[:max_windows]
    total, count = 0.0, 0
    full = [w for w in wins if w[1] - w[0] == context]
    partial = [w for w in wins if w[1] - w[0] != context]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in partial]
    if autocast_dtype is not None and device.type == "cuda":
        ctx = torch.autocast("cuda", dtype=autocast_dtype)
    else:
        ctx = contextlib.nullcontext()
    for group in groups:
        batch = torch.stack([ids[s:e] for s, e in group])
        with ctx:
            logits = model(batch)
        logits = logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll.double())
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, ids: torch.Tensor, context: int, batch_size: int = 16, max_windows: int | None = None) -> dict:
    """The exact float32 validation perplexity (see the module docstring)."""
    was_training = model.training
    model.eval()
    prev_tf32 = None
    if torch.cuda.is_available():
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        total, count = window_nll(model, ids, context, batch_size, max_windows=max_windows)
    finally:
        if prev_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
        model.train(was_training)
    n_windows = len(windows(ids.numel(), context))
    return {
        "ppl": math.exp(total / count),
        "complete": max_windows is None or max_windows >= n_windows,
        "nll_sum": total,
        "tokens_scored": count,
        "windows": n_windows if max_windows is None else min(max_windows, n_windows),
        "context": context,
        "val_tokens": int(ids.numel()),
    }


def main(argv=None):
    from .export import load_model_dir
    from .tokenizer import encode, load_tokenizer

    ap = argparse.ArgumentParser(description="Validation perplexity of an exported model directory.")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--val-text", required=True, type=Path)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    model = load_model_dir(args.model).to(args.device)
    tok = load_tokenizer(args.model / "tokenizer.json")
    ids = torch.tensor(encode(tok, args.val_text.read_bytes().decode("utf-8")), dtype=torch.long)
    print(json.dumps(perplexity(model, ids, args.context), indent=2))


if __name__ == "__main__":
    main()
