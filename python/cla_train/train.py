"""Train one model with the paper's recipe (section 3 of Brandon et al.).

Recipe: AdamW with betas (0.9, 0.95), weight decay 0.1 on matrices (not on the RMSNorm
scales), gradient clipping at global norm 1.0, linear warm-up over the first 5% of the
steps, then cosine decay to 10% of the peak learning rate at the last step. bf16 autocast
on CUDA (float32 master weights). The initialisation and the data order depend only on
``--seed``.

Outputs in ``--out``:

* ``metrics.json``  config, parameter count, KV bytes/token, recipe, training-loss log,
  periodic quick validation perplexity (bf16, first ``--eval-windows`` windows), and at the
  end the exact float32 validation perplexity (evaluate.py's definition), tokens trained,
  timings; rewritten as training goes on.
* ``final/``        ``config.json`` + ``model.safetensors`` (float32) of the trained model.
* ``ckpt.pt``       model + optimizer state every ``--ckpt-every`` steps (0 = never); an
  interrupted run started again with the same arguments resumes from it.

With ``--sync-dir`` the process takes part in the experiment driver's throughput
calibration (see experiments.py) before it trains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import BatchOrder, load_train_tokens, load_val_ids
from .evaluate import perplexity, window_nll
from .export import save_weights
from .model import ClaConfig, ClaForCausalLM


def lr_at(step: int, total_steps: int, peak: float, warmup_frac: float = 0.05, final_frac: float = 0.1) -> float:
    """Learning rate for 0-based ``step``: linear warm-up to ``peak`` over the first
    ``max(1, round(warmup_frac * total_steps))`` steps, then cosine to ``final_frac * peak``
    at the last step."""
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total_steps - 1 - warmup)
    p = min(1.0, (step - warmup) / span)
    floor = final_frac * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_optimizer(model, lr, weight_decay, betas, device_type):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kwargs)


def build_config(args, data_meta: dict) -> ClaConfig:
    arch = json.loads(args.arch) if args.arch else {}
    arch.setdefault("vocab_size", data_meta["vocab_size"])
    arch.setdefault("bos_token_id", data_meta["bos_token_id"])
    arch.setdefault("eos_token_id", data_meta["eos_token_id"])
    arch.setdefault("max_position_embeddings", args.context)
    sharing = arch.pop("sharing", None)
    if sharing is not None and "kv_source_layers" not in arch:
        from .model import sharing_map

        n = arch.get("num_hidden_layers", ClaConfig.num_hidden_layers)
        arch["kv_source_layers"] = sharing_map(sharing, n)
    return ClaConfig(**arch)


def write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def wait_for(path: Path, timeout: float = 900.0) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f}s for {path}")
        time.sleep(0.05)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.data_meta = json.loads((Path(args.data) / "data.json").read_text())
        self.cfg = build_config(args, self.data_meta)
        self.cfg.extra = {
            "seed": args.seed, "lr": args.lr, "context": args.context, "batch_size": args.batch_size,
        }
        self.tokens = load_train_tokens(args.data)
        self.val_ids = load_val_ids(args.data)
        self.tokens_per_step = args.batch_size * args.context
        self.autocast = self.device.type == "cuda" and not args.no_autocast

    def fresh_model(self):
        torch.manual_seed(self.args.seed)
        model = ClaForCausalLM(self.cfg).to(self.device)
        opt = make_optimizer(model, self.args.lr, self.args.weight_decay, (self.args.beta1, self.args.beta2), self.device.type)
        forward = torch.compile(model) if self.args.compile else model

        def step_fn(x, y, lr):
            return self.train_step(model, forward, opt, x, y, lr)

        return model, opt, step_fn

    def loss(self, forward, x, y):
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = forward(x)
        else:
            logits = forward(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    def train_step(self, model, forward, opt, x, y, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        loss = self.loss(forward, x, y)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), gnorm.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- throughput calibration with the experiment driver ----------------------------
    def calibrate(self, sync_dir: Path, name: str) -> int:
        model, opt, step_fn = self.fresh_model()
        order = BatchOrder(self.tokens, self.args.context, self.args.batch_size, self.args.seed + 10_000, self.device)
        x, y = order.next()
        for _ in range(3):  # warm-up: allocator, kernels, compilation
            step_fn(x, y, 1e-5)
        self.sync()
        (sync_dir / f"ready.{name}").write_text("1")
        wait_for(sync_dir / "go")
        t0 = time.time()
        steps = 0
        while time.time() - t0 < self.args.bench_seconds:
            x, y = order.next()
            step_fn(x, y, 1e-5)
            steps += 1
            if steps % 4 == 0:
                self.sync()
        self.sync()
        dt = time.time() - t0
        mem = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0
        write_json(sync_dir / f"bench.{name}.json", {
            "steps": steps, "seconds": dt, "tokens_per_s": steps * self.tokens_per_step / dt, "max_mem_bytes": mem,
        })
        del model, opt
        wait_for(sync_dir / "budget.json", timeout=self.args.bench_seconds * 10 + 600)
        return int(json.loads((sync_dir / "budget.json").read_text())["tokens"])

    # -- training -------------------------------------------------------------------------
    def run(self):
        args = self.args
        t_start = time.time()
        tokens_budget = args.tokens
        if args.sync_dir:
            tokens_budget = self.calibrate(Path(args.sync_dir), args.name or self.out.name)
        total_steps = max(1, tokens_budget // self.tokens_per_step)
        model, opt, step_fn = self.fresh_model()
        order = BatchOrder(self.tokens, args.context, args.batch_size, args.seed, self.device)
        metrics = {
            "name": args.name or self.out.name,
            "status": "running",
            "config": self.cfg.to_dict(),
            "params": model.num_parameters(),
            "params_formula": self.cfg.num_parameters(),
            "params_non_embedding": model.num_parameters() - self.cfg.vocab_size * self.cfg.hidden_size,
            "kv_layers": self.cfg.num_kv_layers,
            "kv_bytes_per_token_16bit": self.cfg.kv_bytes_per_token(2),
            "recipe": {
                "optimizer": "AdamW", "lr": args.lr, "betas": [args.beta1, args.beta2],
                "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                "warmup_frac": args.warmup_frac, "final_lr_frac": args.final_lr_frac,
                "schedule": "linear warm-up, cosine decay", "batch_size": args.batch_size,
                "context": args.context, "tokens_per_step": self.tokens_per_step,
                "autocast": "bf16" if self.autocast else "none", "compile": bool(args.compile),
            },
            "seed": args.seed,
            "tokens_planned": total_steps * self.tokens_per_step,
            "steps_planned": total_steps,
            "train_tokens_available": int(self.tokens.size),
            "val_tokens": int(self.val_ids.numel()),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "log": [],
            "val": [],
        }
        start_step = 0
        ckpt_path = self.out / "ckpt.pt"
        if ckpt_path.exists() and not args.no_resume:
            ck = torch.load(ckpt_path, map_location=self.device, weights_only=False)
            if ck["steps_planned"] == total_steps:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["opt"])
                start_step = ck["step"]
                metrics["log"], metrics["val"] = ck["log"], ck["val"]
                metrics["resumed_from_step"] = start_step
        order.seek(start_step)
        eval_every = args.eval_every or max(1, total_steps // max(1, args.evals))
        log_every = max(1, min(args.log_every, total_steps // 20 or 1))
        write_json(self.out / "metrics.json", metrics)

        model.train()
        t_train0 = time.time()
        eval_time = 0.0
        pending = []
        step = start_step
        truncated = False
        for step in range(start_step, total_steps):
            if args.deadline and time.time() > args.deadline:
                truncated = True
                break
            lr = lr_at(step, total_steps, args.lr, args.warmup_frac, args.final_lr_frac)
            x, y = order.next()
            loss, gnorm = step_fn(x, y, lr)
            pending.append((step, lr, loss, gnorm))
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                for s, lr_s, l, g in pending:
                    if (s + 1) % log_every == 0 or s + 1 == total_steps:
                        metrics["log"].append({
                            "step": s + 1, "tokens": (s + 1) * self.tokens_per_step, "lr": lr_s,
                            "loss": float(l), "grad_norm": float(g), "time": time.time() - t_train0,
                        })
                pending.clear()
                if not math.isfinite(metrics["log"][-1]["loss"]):
                    metrics["status"] = "diverged"
                    break
            if done % eval_every == 0 and done != total_steps:
                te = time.time()
                model.eval()
                nll, n = window_nll(model, self.val_ids, args.context, max_windows=args.eval_windows,
                                    autocast_dtype=torch.bfloat16 if self.autocast else None)
                model.train()
                metrics["val"].append({"step": done, "tokens": done * self.tokens_per_step, "ppl_quick": math.exp(nll / n),
                                       "windows": args.eval_windows})
                eval_time += time.time() - te
                write_json(self.out / "metrics.json", metrics)
            if args.ckpt_every and done % args.ckpt_every == 0 and done != total_steps:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                            "steps_planned": total_steps, "log": metrics["log"], "val": metrics["val"]}, ckpt_path)
        else:
            step = total_steps
        self.sync()
        if metrics["status"] == "diverged":
            steps_done = metrics["log"][-1]["step"]
        elif truncated:
            steps_done = step
        else:
            steps_done = total_steps
        train_seconds = time.time() - t_train0 - eval_time

        te = time.time()
        final = perplexity(model, self.val_ids, args.context, max_windows=args.final_eval_windows or None)
        nll, n = window_nll(model, self.val_ids, args.context, max_windows=args.eval_windows,
                            autocast_dtype=torch.bfloat16 if self.autocast else None)
        metrics["val"].append({"step": steps_done, "tokens": steps_done * self.tokens_per_step,
                               "ppl_quick": math.exp(nll / n), "windows": args.eval_windows})
        final_eval_seconds = time.time() - te
        save_weights(model, self.out / "final")
        if metrics["status"] == "running":
            metrics["status"] = "truncated" if truncated else "done"
        metrics.update({
            "steps": steps_done,
            "tokens_trained": steps_done * self.tokens_per_step,
            "epochs": steps_done * args.batch_size / order.n_chunks,
            "final": final,
            "val_ppl": final["ppl"],
            "train_seconds": train_seconds,
            "tokens_per_second": (steps_done - start_step) * self.tokens_per_step / max(1e-9, train_seconds),
            "eval_seconds": eval_time + final_eval_seconds,
            "wall_seconds": time.time() - t_start,
            "max_mem_bytes": torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0,
        })
        write_json(self.out / "metrics.json", metrics)
        if ckpt_path.exists():
            ckpt_path.unlink()
        return metrics


def parser():
    ap = argparse.ArgumentParser(description="Train one CLA/Llama model (paper recipe).")
    ap.add_argument("--data", required=True, type=Path, help="prepared data dir (experiments prepare)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", default=None)
    ap.add_argument("--arch", default=None,
                    help='JSON of ClaConfig fields, e.g. {"num_key_value_heads": 1, "sharing": "cla2", "kv_input_layernorm": true}')
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (rounded down to whole steps)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evals", type=int, default=10, help="quick validations during training")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between quick validations (overrides --evals)")
    ap.add_argument("--eval-windows", type=int, default=64, help="windows in a quick validation")
    ap.add_argument("--final-eval-windows", type=int, default=0,
                    help="score only the first N windows in the final evaluation (dry runs; 0 = all, the definition)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time after which training stops early")
    ap.add_argument("--sync-dir", type=Path, default=None, help="driver calibration directory")
    ap.add_argument("--bench-seconds", type=float, default=8.0)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    m = Trainer(args).run()
    print(json.dumps({k: m[k] for k in ("name", "status", "val_ppl", "tokens_trained", "train_seconds")}))


if __name__ == "__main__":
    main()
