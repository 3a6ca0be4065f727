"""The reference rates the engine's GPU kernels are compared against, measured with PyTorch.

`python -m cla_train.ceilings [--out FILE]` prints (and writes as JSON) what PyTorch reaches
on the current CUDA device: the device-to-device copy bandwidth (read + write bytes, the
ceiling for memory-bound kernels such as decode attention) and the bf16 matmul rate (the
ceiling the cooperative-matrix matmul is measured against; `gpu_bench --ref-tflops X`).
Run it right before `gpu_bench` on the same card, so that both figures share a card.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def _time_cuda(fn, iters: int) -> float:
    """Seconds per call of `fn`, by CUDA events, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(bytes_: int = 512 << 20, iters: int = 20) -> float:
    """Bytes per second (read + write) of a device-to-device copy of `bytes_` bytes."""
    src = torch.empty(bytes_ // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    secs = _time_cuda(lambda: dst.copy_(src), iters)
    return 2.0 * bytes_ / secs


def matmul_rate(n: int, dtype: torch.dtype = torch.bfloat16, iters: int = 20) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    secs = _time_cuda(lambda: a @ b, iters)
    return 2.0 * n**3 / secs


def measure() -> dict:
    """All ceilings as a JSON-ready dict."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bytes_per_s": copy_bandwidth(),
        "bf16_matmul_flops": {str(n): matmul_rate(n) for n in (4096, 8192)},
        "f16_matmul_flops": {str(n): matmul_rate(n, torch.float16) for n in (4096, 8192)},
    }


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ceilings-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: the ceilings are measured on the GPU the kernels run on")
    result = measure()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        _write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
