import json
import tarfile

from cla_train.experiments import (
    PRESETS,
    build_runs,
    choose_pair,
    pack,
    parser,
    plot_frontier,
    summarize,
    write_results_md,
)
from cla_train.model import ClaConfig, sharing_map


def grid_args(*extra):
    return parser().parse_args(["grid", *extra])


def test_grid_definition():
    runs = build_runs(grid_args())
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 7 * 2 + 2 * 2 * 1
    by_cfg = {}
    for r in runs:
        arch = dict(r.arch)
        sharing = arch.pop("sharing")
        cfg = ClaConfig(**arch, kv_source_layers=sharing_map(sharing, arch["num_hidden_layers"]))
        by_cfg[r.config] = cfg
        assert cfg.hidden_size == 256 and cfg.num_hidden_layers == 8
        assert cfg.kv_input_layernorm == (sharing != "none")
    kv = {k: v.kv_bytes_per_token() for k, v in by_cfg.items()}
    assert kv["H64-MHA"] == 2 * 4 * 64 * 8 * 2
    assert kv["H64-MQA-CLA2"] == kv["H32-MQA"] == kv["H64-MQA"] // 2
    assert kv["H64-GQA2-CLA2"] == kv["H64-MQA"]
    assert by_cfg["H64-MQA-CLA3"].kv_source_layers == [0, 0, 2, 2, 2, 5, 5, 5]
    # Same width, depth and FFN for all; the half-head MQA keeps the query width.
    assert by_cfg["H32-MQA"].num_attention_heads * by_cfg["H32-MQA"].head_dim == 256
    lrs = sorted({r.lr for r in runs if r.config == "H64-MQA-CLA2"})
    assert lrs == [1.5e-3, 3e-3, 6e-3]
    # The shipped models fit the 30 MB limit in float32.
    for name in ("H64-MQA", "H64-MQA-CLA2"):
        assert by_cfg[name].num_parameters() * 4 < 30e6
    assert PRESETS["small"]["context"] == 256


def fake_metrics():
    runs = []
    for cfg, kvb, lr, seed, ppl in [
        ("H64-MQA", 2048, 3e-3, 0, 20.0), ("H64-MQA", 2048, 3e-3, 1, 20.4), ("H64-MQA", 2048, 6e-3, 0, 19.9),
        ("H64-MQA-CLA2", 1024, 3e-3, 0, 20.6), ("H64-MQA-CLA2", 1024, 3e-3, 1, 20.8),
        ("H64-MQA-CLA2", 1024, 6e-3, 0, 20.1), ("H64-MHA", 8192, 3e-3, 0, 19.5), ("H64-MHA", 8192, 3e-3, 1, 19.6),
    ]:
        runs.append({
            "name": f"{cfg}_lr{lr:g}_s{seed}", "status": "done", "val_ppl": ppl, "seed": seed,
            "recipe": {"lr": lr, "context": 256, "batch_size": 64, "tokens_per_step": 16384, "betas": [0.9, 0.95],
                       "weight_decay": 0.1, "grad_clip": 1.0, "warmup_frac": 0.05, "final_lr_frac": 0.1,
                       "autocast": "bf16"},
            "config": {"head_dim": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 256,
                       "num_hidden_layers": 8, "intermediate_size": 704, "vocab_size": 4096},
            "params": 6_500_000, "params_non_embedding": 5_400_000, "kv_bytes_per_token_16bit": kvb,
            "kv_layers": 4 if "CLA2" in cfg else 8, "tokens_trained": 1000, "train_seconds": 10.0,
            "train_tokens_available": 100, "val_tokens": 10, "device": "test",
        })
    runs.append({"name": "H64-GQA2_lr0.003_s0", "status": "failed"})
    return {"runs": runs, "grid": {"runs": [r["name"] for r in runs], "tokens_per_run": 1000, "n_gpus": 1,
                                   "capacity": 9, "wall_seconds": 100}}


def test_report(tmp_path):
    m = fake_metrics()
    rows = summarize(m)
    mqa = [r for r in rows if r["config"] == "H64-MQA" and r["lr"] == 3e-3][0]
    assert mqa["n"] == 2 and abs(mqa["ppl_mean"] - 20.2) < 1e-9 and mqa["ppl_min"] == 20.0
    best, twin = choose_pair(m)
    assert best["name"] == "H64-MQA-CLA2_lr0.006_s0" and twin["name"] == "H64-MQA_lr0.006_s0"
    write_results_md(m, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| H64-MQA-CLA2 |" in text and "Learning-rate sweep" in text and "H64-GQA2_lr0.003_s0 (failed)" in text
    p = plot_frontier(m, tmp_path / "frontier.png")
    assert p.exists() and p.stat().st_size > 1000


def test_pack_splits_and_reassembles(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"a": 1}))
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 400)
    out = tmp_path / "out"
    out.mkdir()
    info = pack(d, out, "mqa", max_bytes=40_000)
    assert len(info["parts"]) > 1 and not (out / "mqa.tar").exists()
    whole = b"".join((out / p).read_bytes() for p in info["parts"])
    assert len(whole) == info["bytes"]
    (tmp_path / "re.tar").write_bytes(whole)
    with tarfile.open(tmp_path / "re.tar") as tf:
        assert sorted(tf.getnames()) == ["mqa/config.json", "mqa/model.safetensors"]
    info2 = pack(d, tmp_path, "one", max_bytes=10**9)
    assert info2["parts"] == ["one.tar"]
