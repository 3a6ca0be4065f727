"""The small-scale CLA experiment: a grid of trainings run concurrently on one machine.

    python -m cla_train.experiments all --corpus shared/data/corpus --work /tmp/cla-work --out OUT

Steps (each is also a sub-command):

* ``prepare``  split the corpus, tokenize it (data.py) into ``WORK/data``.
* ``grid``     train every run of the grid as parallel processes (several per GPU, runs
  spread round-robin over the GPUs). With ``--tokens auto`` the processes first measure
  their throughput together (a barrier, then ``--bench-seconds`` of real training steps,
  then a fresh start from the seed) and the driver picks the one token budget that all
  runs get so that the grid ends inside ``--wall-budget`` seconds. Every process also gets
  a deadline, after which it stops early (status "truncated") and still evaluates and
  saves, so results come back even if the estimate was wrong.
* ``report``   collect every run's metrics into one JSON, write results.md and frontier.png,
  export the best MQA-CLA2 run and its plain-MQA twin (same seed, same learning rate) as
  model directories (with golden outputs) and pack each as one .tar (split into
  ``.tar.partN`` pieces when larger than ``--max-file-mib``).

The grid (same data, token budget, width, depth and recipe for all; ``--seeds`` seeds each):
MHA, GQA (n_heads/2 K/V heads), GQA-CLA2, MQA, MQA-CLA2, MQA with head_dim/2 (2x the query
heads; the same KV bytes/token as MQA-CLA2), MQA-CLA3; plus a learning-rate sweep
(``--lr`` times each of ``--sweep-mults``) for MQA and MQA-CLA2 with ``--sweep-seeds`` seeds.
CLA models have the separate K/V-input RMSNorm scale (kv_input_layernorm), as in the paper.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PKG_PARENT = Path(__file__).resolve().parent.parent

PRESETS = {
    # d_model 256, 8 layers, 4 query heads of 64, SwiGLU 704, context 256, batch 64 x 256.
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4, head_dim=64,
                  context=256, batch_size=64),
    # For a CPU dry run of the whole pipeline.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=5, num_attention_heads=4, head_dim=16,
                 context=64, batch_size=8),
}


@dataclass
class Run:
    name: str
    config: str  # grid config name, e.g. H64-MQA-CLA2
    family: str  # MHA / GQA / MQA (+ -CLA2 ...), independent of head_dim
    arch: dict
    lr: float
    seed: int
    sweep: bool = False
    extra: dict = field(default_factory=dict)


def grid_configs(preset: dict) -> list[tuple[str, str, dict]]:
    """(config name, family, arch overrides) of the grid, named like the paper's Table 1."""
    h, hd = preset["num_attention_heads"], preset["head_dim"]
    base = {k: preset[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    gqa = max(1, h // 2)

    def arch(heads, head_dim, kv, sharing):
        a = dict(base, num_attention_heads=heads, head_dim=head_dim, num_key_value_heads=kv, sharing=sharing)
        a["kv_input_layernorm"] = sharing != "none"
        return a

    return [
        (f"H{hd}-MHA", "MHA", arch(h, hd, h, "none")),
        (f"H{hd}-GQA{gqa}", "GQA", arch(h, hd, gqa, "none")),
        (f"H{hd}-GQA{gqa}-CLA2", "GQA-CLA2", arch(h, hd, gqa, "cla2")),
        (f"H{hd}-MQA", "MQA", arch(h, hd, 1, "none")),
        (f"H{hd}-MQA-CLA2", "MQA-CLA2", arch(h, hd, 1, "cla2")),
        (f"H{hd // 2}-MQA", "MQA-halfhead", arch(2 * h, hd // 2, 1, "none")),
        (f"H{hd}-MQA-CLA3", "MQA-CLA3", arch(h, hd, 1, "cla3")),
    ]


def build_runs(args) -> list[Run]:
    preset = PRESETS[args.preset]
    runs = []
    configs = grid_configs(preset)
    only = set(args.only.split(",")) if args.only else None
    for name, family, arch in configs:
        if only and family not in only and name not in only:
            continue
        for seed in range(args.seeds):
            runs.append(Run(f"{name}_lr{args.lr:g}_s{seed}", name, family, arch, args.lr, seed))
    for name, family, arch in configs:
        if family not in ("MQA", "MQA-CLA2") or (only and family not in only and name not in only):
            continue
        for mult in args.sweep_mults:
            if mult == 1.0:
                continue
            lr = args.lr * mult
            for seed in range(args.sweep_seeds):
                runs.append(Run(f"{name}_lr{lr:g}_s{seed}", name, family, arch, lr, seed, sweep=True))
    return runs


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------

LOG: list[str] = []
T0 = time.time()


def log(msg: str) -> None:
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    LOG.append(line)
    print(line, flush=True)


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


def cmd_prepare(args) -> dict:
    from .data import prepare_data

    return prepare_data(args.corpus, Path(args.work) / "data", args.tokenizer, log=log)


# --------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------


def gpu_info() -> tuple[int, list[float]]:
    """(number of GPUs, free GiB of each), without creating a CUDA context here."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode == 0:
            free = [float(x) / 1024 for x in out.stdout.split() if x.strip()]
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            if vis:
                idx = [int(i) for i in vis.split(",") if i.strip().isdigit()]
                free = [free[i] for i in idx if i < len(free)]
            return len(free), free
    except (OSError, subprocess.SubprocessError):
        pass
    # No nvidia-smi: ask torch in a child process, so that this process holds no CUDA context.
    probe = ("import json, torch\n"
             "n = torch.cuda.device_count()\n"
             "print(json.dumps([torch.cuda.mem_get_info(i)[0] / 2**30 for i in range(n)]))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        free = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
        return len(free), free
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0, []


class Worker:
    def __init__(self, run: Run, cmd: list[str], env: dict, run_dir: Path, gpu):
        self.run, self.cmd, self.env, self.run_dir, self.gpu = run, cmd, env, run_dir, gpu
        self.proc = None
        self.t_start = None
        self.t_end = None
        self.calibrating = False

    def start(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.run_dir / "log.txt", "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT, cwd=str(PKG_PARENT))
        self.t_start = time.time()

    def poll(self):
        if self.proc is None or self.t_end is not None:
            return self.proc.returncode if self.proc else None
        rc = self.proc.poll()
        if rc is not None:
            self.t_end = time.time()
            self.logf.close()
        return rc

    def tail(self, n=15) -> str:
        try:
            return "\n".join((self.run_dir / "log.txt").read_text().splitlines()[-n:])
        except OSError:
            return ""


def cmd_grid(args) -> None:
    work = Path(args.work)
    data_dir = work / "data"
    runs_dir = work / "runs"
    sync = work / "sync"
    if sync.exists():
        shutil.rmtree(sync)
    sync.mkdir(parents=True)
    preset = PRESETS[args.preset]
    runs = build_runs(args)
    n_gpus, free = gpu_info()
    if args.device == "cpu":
        n_gpus = 0
    if n_gpus:
        if args.procs_per_gpu > 0:
            per_gpu = args.procs_per_gpu
        else:
            fits = [int(max(1, (f - 3.0) // args.mem_per_run_gib)) if not math.isnan(f) else 16 for f in free]
            per_gpu = min(fits)
        capacity = per_gpu * n_gpus
        threads = args.threads or 1
        log(f"grid: {len(runs)} runs on {n_gpus} GPU(s) (free GiB {['%.1f' % f for f in free]}), "
            f"up to {per_gpu} concurrent per GPU")
    else:
        capacity = args.cpu_procs or max(1, os.cpu_count() or 1)
        threads = args.threads or max(1, (os.cpu_count() or 1) // min(capacity, len(runs)))
        log(f"grid: {len(runs)} runs on CPU, up to {capacity} concurrent, {threads} thread(s) each")
    auto = args.tokens == "auto"
    deadline = T0 + args.wall_budget - args.final_reserve
    workers = []
    for i, run in enumerate(runs):
        gpu = (i % n_gpus) if n_gpus else None
        run_dir = runs_dir / run.name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd = [
            sys.executable, "-m", "cla_train.train",
            "--data", str(data_dir.resolve()), "--out", str(run_dir.resolve()), "--name", run.name,
            "--arch", json.dumps(run.arch), "--lr", repr(run.lr), "--seed", str(run.seed),
            "--context", str(preset["context"]), "--batch-size", str(preset["batch_size"]),
            "--threads", str(threads), "--evals", str(args.evals), "--eval-windows", str(args.eval_windows),
            "--deadline", repr(deadline), "--device", "cuda" if n_gpus else "cpu",
            "--bench-seconds", repr(args.bench_seconds),
        ]
        if args.final_eval_windows:
            cmd += ["--final-eval-windows", str(args.final_eval_windows)]
        if args.compile:
            cmd.append("--compile")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PKG_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu) if not os.environ.get("CUDA_VISIBLE_DEVICES") else \
                os.environ["CUDA_VISIBLE_DEVICES"].split(",")[gpu]
        workers.append(Worker(run, cmd, env, run_dir, gpu))

    try:
        tokens = _run_workers(args, workers, capacity, sync, preset, auto)
    finally:
        for w in workers:  # never leave a process of ours behind (error or hard stop)
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
    (work / "grid.json").write_text(json.dumps({
        "tokens_per_run": tokens, "runs": [w.run.name for w in workers], "capacity": capacity,
        "n_gpus": n_gpus, "wall_seconds": time.time() - T0, "preset": args.preset,
    }, indent=1) + "\n")
    log(f"grid done in {time.time() - T0:.0f}s")


def _run_workers(args, workers, capacity, sync, preset, auto) -> int:
    first = workers[:capacity]
    rest = workers[capacity:]
    tokens_per_step = preset["batch_size"] * preset["context"]
    if auto:
        for w in first:
            w.cmd += ["--sync-dir", str(sync.resolve())]
            w.calibrating = True
            w.start()
        tokens = calibrate(args, first, sync, tokens_per_step, len(workers), capacity)
        for w in rest:
            w.cmd += ["--tokens", str(tokens)]
    else:
        tokens = int(args.tokens)
        for w in workers:
            w.cmd += ["--tokens", str(tokens)]
        for w in first:
            w.start()
    queue = list(rest)
    last_report = time.time()
    while True:
        running = [w for w in workers if w.proc is not None and w.poll() is None]
        for w in workers:
            if w.proc is not None and w.t_end is not None and not getattr(w, "reported", False):
                w.reported = True
                status = _run_status(w.run_dir)
                log(f"finished {w.run.name}: rc={w.proc.returncode} {status}")
                if w.proc.returncode != 0:
                    log("  log tail:\n" + w.tail())
        while queue and len(running) < capacity:
            w = queue.pop(0)
            w.start()
            running.append(w)
            log(f"started {w.run.name}")
        if not running and not queue:
            break
        if time.time() > T0 + args.wall_budget - args.hard_stop_margin:
            for w in running:
                log(f"hard stop: killing {w.run.name} (still running at the wall budget)")
                w.proc.kill()
            for w in queue:
                log(f"hard stop: {w.run.name} never started")
            break
        if time.time() - last_report > args.progress_every:
            last_report = time.time()
            prog = []
            for w in running:
                try:
                    m = json.loads((w.run_dir / "metrics.json").read_text())
                    step = m["log"][-1]["step"] if m["log"] else 0
                    prog.append(f"{step}/{m['steps_planned']}")
                except (OSError, ValueError, KeyError):
                    prog.append("?")
            log(f"running {len(running)}, queued {len(queue)}; steps: {' '.join(prog)}")
        time.sleep(0.5)
    return tokens


def _run_status(run_dir: Path) -> str:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
        ppl = m.get("val_ppl")
        return f"{m['status']} val_ppl={ppl:.3f} tokens={m.get('tokens_trained')}" if ppl else m["status"]
    except (OSError, ValueError, KeyError):
        return "no metrics"


def calibrate(args, workers, sync: Path, tokens_per_step: int, n_runs: int, capacity: int) -> int:
    """Barrier + concurrent throughput measurement; returns the token budget per run."""
    t_wait = time.time()
    while True:
        alive = [w for w in workers if w.poll() is None]
        ready = [w for w in alive if (sync / f"ready.{w.run.name}").exists()]
        if len(ready) == len(alive):
            break
        if time.time() - t_wait > args.calibration_timeout:
            log(f"calibration: only {len(ready)}/{len(alive)} workers ready after {args.calibration_timeout}s; going on")
            break
        time.sleep(0.2)
    for w in workers:
        if w.poll() is not None:
            log(f"worker {w.run.name} died before calibration:\n{w.tail()}")
    t_ready = time.time()
    (sync / "go").write_text("1")
    log(f"calibration: {len(ready)} workers ready at {time.time() - T0:.1f}s, measuring for {args.bench_seconds}s")
    t_bench = time.time()
    benches = {}
    while True:
        alive = [w for w in workers if w.poll() is None]
        for w in alive:
            p = sync / f"bench.{w.run.name}.json"
            if w.run.name not in benches and p.exists():
                try:
                    benches[w.run.name] = json.loads(p.read_text())
                except ValueError:
                    pass
        if all(w.run.name in benches for w in alive):
            break
        if time.time() - t_bench > args.bench_seconds * 4 + 60:
            log("calibration: some workers did not report; using those that did")
            break
        time.sleep(0.2)
    rates = {k: v["tokens_per_s"] for k, v in benches.items()}
    if not rates:
        raise RuntimeError("no worker finished the throughput measurement")
    r_min, r_sum = min(rates.values()), sum(rates.values())
    waves = math.ceil(n_runs / capacity)
    # A queued run pays the same start-up as the first wave did (launch to ready).
    startup = max(args.start_overhead, t_ready - min(w.t_start for w in workers))
    elapsed = time.time() - T0
    remaining = args.wall_budget - elapsed - args.final_reserve - (waves - 1) * startup
    tokens = int(r_min * max(0.0, remaining) * args.safety / waves)
    tokens = min(tokens, args.max_tokens)
    tokens = max(tokens_per_step, tokens // tokens_per_step * tokens_per_step)
    if tokens < args.min_tokens:
        log(f"WARNING: the time budget allows only {tokens} tokens per run (< --min-tokens {args.min_tokens})")
    mem = max((v.get("max_mem_bytes", 0) for v in benches.values()), default=0) / 2**30
    log(f"calibration: aggregate {r_sum:,.0f} tok/s, slowest run {r_min:,.0f} tok/s, max mem/run {mem:.2f} GiB; "
        f"start-up {startup:.0f}s, {waves} wave(s), {remaining:.0f}s left for training -> {tokens:,} tokens per run "
        f"({tokens // tokens_per_step} steps, ~{tokens / r_min:.0f}s per wave)")
    (sync / "calibration.json").write_text(json.dumps({"rates": rates, "tokens": tokens, "elapsed": elapsed}, indent=1))
    tmp = sync / "budget.json.tmp"
    tmp.write_text(json.dumps({"tokens": tokens}))
    os.replace(tmp, sync / "budget.json")
    return tokens


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def collect(work: Path) -> dict:
    runs = []
    for p in sorted((work / "runs").glob("*/metrics.json")):
        try:
            runs.append(json.loads(p.read_text()))
        except ValueError:
            runs.append({"name": p.parent.name, "status": "unreadable"})
    grid = {}
    if (work / "grid.json").exists():
        grid = json.loads((work / "grid.json").read_text())
    calib = {}
    if (work / "sync" / "calibration.json").exists():
        calib = json.loads((work / "sync" / "calibration.json").read_text())
    data = {}
    if (work / "data" / "data.json").exists():
        data = json.loads((work / "data" / "data.json").read_text())
    return {"format": "cla-small-metrics-v1", "grid": grid, "calibration": calib, "data": data, "runs": runs}


def _grid_name(run: dict) -> str:
    return run["name"].split("_lr")[0]


def _usable_status(metrics: dict) -> set:
    """Finished runs only; if none finished (all hit the deadline), the truncated ones."""
    if any(r.get("status") == "done" for r in metrics["runs"]):
        return {"done"}
    return {"done", "truncated"}


def summarize(metrics: dict) -> list[dict]:
    """One row per (config, lr): mean / min / max of the final val ppl over seeds."""
    groups: dict[tuple, list] = {}
    usable = _usable_status(metrics)
    for r in metrics["runs"]:
        if r.get("status") not in usable or not r.get("val_ppl"):
            continue  # truncated runs had a smaller budget: listed apart, not averaged in
        key = (_grid_name(r), r["recipe"]["lr"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (name, lr), rs in groups.items():
        ppls = [r["val_ppl"] for r in rs]
        cfg = rs[0]["config"]
        rows.append({
            "config": name, "lr": lr, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
            "ppl_mean": statistics.fmean(ppls), "ppl_min": min(ppls), "ppl_max": max(ppls),
            "ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
            "params": rs[0]["params"], "params_non_embedding": rs[0]["params_non_embedding"],
            "kv_bytes": rs[0]["kv_bytes_per_token_16bit"], "kv_layers": rs[0]["kv_layers"],
            "head_dim": cfg["head_dim"], "q_heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"],
            "tokens": statistics.fmean(r["tokens_trained"] for r in rs),
            "train_s": statistics.fmean(r["train_seconds"] for r in rs),
        })
    rows.sort(key=lambda r: (-r["kv_bytes"], r["config"], r["lr"]))
    return rows


def base_lr(metrics: dict) -> float | None:
    """The learning rate of the main grid: the one every config was trained with."""
    by_lr: dict[float, set] = {}
    for r in metrics["runs"]:
        if "recipe" in r:
            by_lr.setdefault(r["recipe"]["lr"], set()).add(_grid_name(r))
    if not by_lr:
        return None
    return max(by_lr, key=lambda lr: (len(by_lr[lr]), -lr))


def choose_pair(metrics: dict) -> tuple[dict | None, dict | None]:
    """Best MQA-CLA2 run (lowest final val ppl, any LR/seed) and the plain-MQA run with the
    same seed and learning rate (its twin)."""
    usable = _usable_status(metrics)
    ok = [r for r in metrics["runs"] if r.get("status") in usable and r.get("val_ppl")]
    cla = [r for r in ok if _grid_name(r).endswith("-MQA-CLA2")]
    if not cla:
        return None, None
    best = min(cla, key=lambda r: r["val_ppl"])
    hd = best["config"]["head_dim"]
    twins = [r for r in ok if _grid_name(r) == f"H{hd}-MQA"]
    same = [r for r in twins if r["seed"] == best["seed"] and r["recipe"]["lr"] == best["recipe"]["lr"]]
    twin = same[0] if same else (min(twins, key=lambda r: r["val_ppl"]) if twins else None)
    return best, twin


def _fmt_lr(lr: float) -> str:
    return f"{lr:.2e}".replace("e-0", "e-")


def write_results_md(metrics: dict, path: Path, plot_name: str = "frontier.png") -> None:
    rows = summarize(metrics)
    blr = base_lr(metrics)
    grid = metrics.get("grid", {})
    runs = [r for r in metrics["runs"] if "recipe" in r]
    lines = ["# CLA at small scale: results", ""]
    if runs:
        r0 = runs[0]
        c0 = r0["config"]
        rec = r0["recipe"]
        lines += [
            f"All models: d_model {c0['hidden_size']}, {c0['num_hidden_layers']} layers, SwiGLU {c0['intermediate_size']}, "
            f"vocab {c0['vocab_size']} (byte-level BPE, tied embeddings), context {rec['context']}, "
            f"batch {rec['batch_size']} x {rec['context']} = {rec['tokens_per_step']} tokens/step, "
            f"AdamW ({rec['betas'][0]}, {rec['betas'][1]}), weight decay {rec['weight_decay']}, clip {rec['grad_clip']}, "
            f"{int(rec['warmup_frac'] * 100)}% warm-up, cosine to {int(rec['final_lr_frac'] * 100)}% of peak, "
            f"{'bf16 autocast' if rec['autocast'] == 'bf16' else 'float32 (no autocast)'}. Data: the corpus training split "
            f"({r0['train_tokens_available']:,} tokens; validation {r0['val_tokens']:,} tokens).",
            "",
            "Val PPL = exp(mean NLL) over the validation text cut into non-overlapping windows of "
            f"{rec['context']} tokens, float32, every position after the first of each window scored "
            "(identical to `cla eval --context T --stride T`). Spread = min-max over seeds. "
            "KV bytes/token at 16 bits = 2 x KV heads x head_dim x KV layers x 2.",
            "",
        ]
    if grid:
        n_gpus = grid.get("n_gpus", 0)
        dev = runs[0].get("device", "?") if runs else "?"
        where = f"{n_gpus} GPU(s) ({dev})" if n_gpus else f"CPU only ({dev})"
        lines += [
            f"Grid: {len(grid.get('runs', []))} runs, {grid.get('tokens_per_run', 0):,} training tokens each, "
            f"on {where}, up to {grid.get('capacity')} runs at a time, "
            f"{grid.get('wall_seconds', 0):.0f} s wall for the whole grid (start to last run saved). "
            "Train s = wall-clock seconds of a run's training loop while it shared the device with the other runs"
            + (f"; GPU time of the whole grid: {grid.get('wall_seconds', 0) * n_gpus:.0f} GPU-seconds." if n_gpus else "."),
            "",
        ]
    lines += [f"## Main grid (peak LR {_fmt_lr(blr) if blr else '?'})", ""]
    head = "| config | d_head | Q heads | KV heads | KV layers | params | KV bytes/token | val PPL mean | spread (min-max) | seeds | tokens trained | train s |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["lr"] != blr:
            continue
        lines.append(
            f"| {r['config']} | {r['head_dim']} | {r['q_heads']} | {r['kv_heads']} | {r['kv_layers']} | "
            f"{r['params']:,} | {r['kv_bytes']:,} | {r['ppl_mean']:.3f} | {r['ppl_min']:.3f}-{r['ppl_max']:.3f} | "
            f"{r['n']} | {r['tokens']:,.0f} | {r['train_s']:.0f} |"
        )
    sweep = [r for r in rows if any(r["config"] == s["config"] and s["lr"] != blr for s in rows)]
    if sweep:
        lines += ["", "## Learning-rate sweep", "",
                  "| config | peak LR | KV bytes/token | val PPL mean | spread (min-max) | seeds |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(sweep, key=lambda r: (r["config"], r["lr"])):
            lines.append(f"| {r['config']} | {_fmt_lr(r['lr'])} | {r['kv_bytes']:,} | {r['ppl_mean']:.3f} | "
                         f"{r['ppl_min']:.3f}-{r['ppl_max']:.3f} | {r['n']} |")
        best = {}
        for r in sweep:
            if r["config"] not in best or r["ppl_mean"] < best[r["config"]]["ppl_mean"]:
                best[r["config"]] = r
        lines += [""] + [f"- best peak LR for {k}: {_fmt_lr(v['lr'])} (val PPL {v['ppl_mean']:.3f})" for k, v in sorted(best.items())]
    truncated = [r for r in metrics["runs"] if r.get("status") == "truncated"]
    if truncated and "truncated" in _usable_status(metrics):
        lines += ["", "NOTE: every run reached the deadline before its planned budget; the tables show "
                  "the truncated runs (their LR schedules did not finish)."]
    elif truncated:
        lines += ["", "Runs stopped early at the deadline (not in the tables above): " + ", ".join(
            f"{r['name']} ({r.get('tokens_trained', 0):,} of {r.get('tokens_planned', 0):,} tokens, "
            f"val PPL {r.get('val_ppl', float('nan')):.3f})" for r in truncated)]
    failed = [r for r in metrics["runs"] if r.get("status") not in ("done", "truncated")]
    if failed:
        lines += ["", "Runs without a result: " + ", ".join(f"{r['name']} ({r.get('status')})" for r in failed)]
    exported = metrics.get("exported", {})
    if exported:
        lines += ["", "## Exported models", ""]
        for key, e in exported.items():
            lines.append(f"- `{e['archive']}`: run `{e['run']}` (val PPL {e['val_ppl']:.3f}, "
                         f"{e['kv_bytes_per_token_16bit']} KV bytes/token, {e['params']:,} params)")
    lines += ["", f"![frontier]({plot_name})", ""]
    Path(path).write_text("\n".join(lines))


def plot_frontier(metrics: dict, path: Path) -> Path:
    rows = summarize(metrics)
    blr = base_lr(metrics)
    main = [r for r in rows if r["lr"] == blr]
    sweep_cfgs = sorted({r["config"] for r in rows if r["lr"] != blr})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return _svg_frontier(main, Path(path).with_suffix(".svg"))
    fig, axes = plt.subplots(1, 2 if sweep_cfgs else 1, figsize=(12 if sweep_cfgs else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    for r in main:
        cla = "CLA" in r["config"]
        yerr = [[r["ppl_mean"] - r["ppl_min"]], [r["ppl_max"] - r["ppl_mean"]]]
        ax.errorbar([r["kv_bytes"]], [r["ppl_mean"]], yerr=yerr, fmt="o" if cla else "s",
                    color="tab:red" if cla else "tab:blue", capsize=3)
        ax.annotate(r["config"], (r["kv_bytes"], r["ppl_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for cfg in sweep_cfgs:
        rs = [r for r in rows if r["config"] == cfg]
        b = min(rs, key=lambda r: r["ppl_mean"])
        ax.plot([b["kv_bytes"]], [b["ppl_mean"]], marker="*", markersize=11, linestyle="none",
                markerfacecolor="none", color="tab:red" if "CLA" in cfg else "tab:blue")
        ax.annotate(f"{cfg} @ best LR {_fmt_lr(b['lr'])}", (b["kv_bytes"], b["ppl_mean"]), textcoords="offset points",
                    xytext=(5, -11), fontsize=7, color="dimgray")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("KV cache bytes per token (16-bit)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Accuracy vs KV cache size (peak LR {_fmt_lr(blr) if blr else '?'}; red = CLA)")
    ax.grid(True, which="both", alpha=0.3)
    if sweep_cfgs:
        ax2 = axes[0][1]
        for cfg in sweep_cfgs:
            rs = sorted((r for r in rows if r["config"] == cfg), key=lambda r: r["lr"])
            ax2.errorbar([r["lr"] for r in rs], [r["ppl_mean"] for r in rs],
                         yerr=[[r["ppl_mean"] - r["ppl_min"] for r in rs], [r["ppl_max"] - r["ppl_mean"] for r in rs]],
                         marker="o", capsize=3, label=cfg, color="tab:red" if "CLA" in cfg else "tab:blue")
        ax2.set_xscale("log")
        ax2.set_xlabel("peak learning rate")
        ax2.set_ylabel("validation perplexity")
        ax2.set_title("Learning-rate sweep")
        ax2.legend()
        ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _svg_frontier(main: list[dict], path: Path) -> Path:
    """A hand-written SVG scatter plot (log2 x axis), for machines without matplotlib."""
    w, h, m = 640, 420, 60
    if not main:
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
        return path
    xs = [math.log2(r["kv_bytes"]) for r in main]
    ys = [r["ppl_mean"] for r in main]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    y0, y1 = min(r["ppl_min"] for r in main), max(r["ppl_max"] for r in main)
    pad = (y1 - y0) * 0.15 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def py(y):
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">KV cache bytes per token (16-bit, log scale)</text>',
             f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">validation perplexity</text>']
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        parts.append(f'<text x="{px(e):.1f}" y="{h - m + 15}" text-anchor="middle">{2 ** e}</text>')
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{m - 5}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
    for r, x, y in zip(main, xs, ys):
        color = "crimson" if "CLA" in r["config"] else "steelblue"
        parts.append(f'<line x1="{px(x):.1f}" y1="{py(r["ppl_min"]):.1f}" x2="{px(x):.1f}" y2="{py(r["ppl_max"]):.1f}" stroke="{color}"/>')
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}">{r["config"]}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack(model_dir: Path, out: Path, stem: str, max_bytes: int) -> dict:
    """Tars model_dir as OUT/stem.tar (member names stem/...); splits it into
    stem.tar.part0, .part1, ... when larger than max_bytes."""
    tar_path = Path(out) / f"{stem}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(Path(model_dir).iterdir()):
            tf.add(p, arcname=f"{stem}/{p.name}")
    size = tar_path.stat().st_size
    info = {"archive": tar_path.name, "bytes": size, "sha256": _sha256(tar_path), "parts": [tar_path.name]}
    if size > max_bytes:
        parts = []
        with open(tar_path, "rb") as f:
            k = 0
            while True:
                chunk = f.read(max_bytes)
                if not chunk:
                    break
                part = Path(out) / f"{stem}.tar.part{k}"
                part.write_bytes(chunk)
                parts.append(part.name)
                k += 1
        tar_path.unlink()
        info["parts"] = parts
        info["reassemble"] = f"cat {' '.join(parts)} > {stem}.tar"
    return info


def cmd_report(args) -> dict:
    work = Path(args.work) if args.work else None
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text())
    else:
        metrics = collect(work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if work is not None and not args.metrics:
        from .export import export_model_dir, load_model_dir

        best, twin = choose_pair(metrics)
        exported = {}
        for key, stem, r in (("mqa_cla2", "mqa-cla2", best), ("mqa", "mqa", twin)):
            if r is None:
                log(f"report: no finished run for {key}; nothing exported")
                continue
            dest = work / "export" / stem
            if dest.exists():
                shutil.rmtree(dest)
            model = load_model_dir(work / "runs" / r["name"] / "final")
            golden = export_model_dir(model, dest, work / "data" / "tokenizer.json",
                                      (work / "data" / "val.txt").read_bytes().decode("utf-8"))
            info = pack(dest, out, stem, int(args.max_file_mib * 2**20))
            info.update({"run": r["name"], "val_ppl": r["val_ppl"], "params": r["params"],
                         "kv_bytes_per_token_16bit": r["kv_bytes_per_token_16bit"],
                         "golden_greedy_text": golden["greedy_text"]})
            exported[key] = info
            log(f"report: exported {r['name']} -> {', '.join(info['parts'])} ({info['bytes'] / 2**20:.1f} MiB)")
        metrics["exported"] = exported
    metrics["driver_log"] = LOG
    plot = plot_frontier(metrics, out / "frontier.png")
    write_results_md(metrics, out / "results.md", plot.name)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"report: wrote {out / 'results.md'}, {plot}, {out / 'metrics.json'}")
    return metrics


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, grid=True):
        p.add_argument("--work", type=Path, default=Path("/tmp/cla-work"), help="working directory (data, runs)")
        if not grid:
            return
        p.add_argument("--corpus", type=Path, default=Path("shared/data/corpus"))
        p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the packaged one)")
        p.add_argument("--preset", choices=sorted(PRESETS), default="small")
        p.add_argument("--tokens", default="auto", help="training tokens per run, or 'auto' (fit --wall-budget)")
        p.add_argument("--wall-budget", type=float, default=450.0,
                       help="seconds from the driver's start by which everything (report included) should be done")
        p.add_argument("--final-reserve", type=float, default=45.0,
                       help="seconds kept after the training deadline for final evaluation, export and report")
        p.add_argument("--hard-stop-margin", type=float, default=15.0,
                       help="kill runs still going this many seconds before the end of --wall-budget")
        p.add_argument("--start-overhead", type=float, default=20.0, help="seconds a queued run needs to start")
        p.add_argument("--safety", type=float, default=0.85, help="fraction of the estimated time to plan for")
        p.add_argument("--max-tokens", type=int, default=32_000_000, help="cap of the auto budget per run")
        p.add_argument("--min-tokens", type=int, default=2_000_000, help="warn below this auto budget")
        p.add_argument("--bench-seconds", type=float, default=8.0)
        p.add_argument("--calibration-timeout", type=float, default=240.0)
        p.add_argument("--lr", type=float, default=3e-3, help="peak LR of the main grid")
        p.add_argument("--sweep-mults", type=float, nargs="*", default=[0.5, 1.0, 2.0])
        p.add_argument("--seeds", type=int, default=2)
        p.add_argument("--sweep-seeds", type=int, default=1)
        p.add_argument("--only", default="", help="comma-separated families or config names to run (default: all)")
        p.add_argument("--evals", type=int, default=8)
        p.add_argument("--eval-windows", type=int, default=64)
        p.add_argument("--final-eval-windows", type=int, default=0,
                       help="limit the final evaluation to this many windows (dry runs only; 0 = all)")
        p.add_argument("--device", choices=["auto", "cpu"], default="auto")
        p.add_argument("--procs-per-gpu", type=int, default=0, help="concurrent runs per GPU (0 = by free memory)")
        p.add_argument("--mem-per-run-gib", type=float, default=3.5, help="GPU memory to plan per run")
        p.add_argument("--cpu-procs", type=int, default=0)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--compile", action="store_true")
        p.add_argument("--progress-every", type=float, default=30.0)

    p = sub.add_parser("prepare", help="split + tokenize the corpus into WORK/data")
    common(p)
    p = sub.add_parser("grid", help="train the grid (needs prepare)")
    common(p)
    p = sub.add_parser("report", help="metrics JSON, results.md, frontier.png, packed models")
    common(p, grid=False)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, default=None,
                   help="rebuild results.md/frontier.png from a metrics.json (no export)")
    p.add_argument("--max-file-mib", type=float, default=15.9)
    p = sub.add_parser("all", help="prepare + grid + report")
    common(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-file-mib", type=float, default=15.9)
    p = sub.add_parser("list", help="print the runs of the grid")
    common(p)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cmd == "list":
        for r in build_runs(args):
            print(r.name, json.dumps(r.arch))
        return
    if args.cmd in ("prepare", "all"):
        cmd_prepare(args)
    if args.cmd in ("grid", "all"):
        cmd_grid(args)
    if args.cmd in ("report", "all"):
        if args.cmd == "all":
            args.metrics = None
        cmd_report(args)


if __name__ == "__main__":
    main()
