import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cla_train.data import prepare_data
from cla_train.evaluate import perplexity, windows
from cla_train.export import export_model_dir, load_model_dir
from cla_train.model import ClaConfig, ClaForCausalLM, sharing_map
from cla_train.train import Trainer, lr_at, parser
from cla_train.tokenizer import ASSET


def test_windows_rule():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail is dropped
    assert windows(1, 4) == []


def test_perplexity_definition():
    torch.manual_seed(0)
    cfg = ClaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, kv_source_layers=[0, 0])
    model = ClaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (23,))
    got = perplexity(model, ids, context=5, batch_size=2)
    total, n = 0.0, 0
    for s in range(0, 23, 5):
        w = ids[s : s + 5]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logp = model(w).double().log_softmax(-1)
        for j in range(len(w) - 1):
            total -= float(logp[j, w[j + 1]])
            n += 1
    assert got["tokens_scored"] == n == 4 * 4 + 2
    assert math.isclose(got["ppl"], math.exp(total / n), rel_tol=1e-6)


def test_lr_schedule():
    total, peak = 200, 1e-3
    lrs = [lr_at(s, total, peak) for s in range(total)]
    assert math.isclose(lrs[9], peak) and lrs[0] == pytest.approx(peak / 10)  # 5% of 200 = 10 warm-up steps
    assert math.isclose(lrs[-1], 0.1 * peak)
    assert max(lrs) == pytest.approx(peak)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("sharing,kvnorm,tied", [("cla2", True, True), ("none", False, False), ("cla3", True, False)])
def test_export_round_trip(tmp_path, sharing, kvnorm, tied):
    torch.manual_seed(5)
    cfg = ClaConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, kv_source_layers=sharing_map(sharing, 4),
                    kv_input_layernorm=kvnorm, tie_word_embeddings=tied)
    model = ClaForCausalLM(cfg).eval()
    out = tmp_path / "model"
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, " * 3
    info = export_model_dir(model, out, ASSET, text)
    names = set(load_file(str(out / "model.safetensors")).keys())
    assert ("lm_head.weight" in names) == (not tied)
    for i in range(4):
        producer = cfg.kv_source_layers[i] == i
        assert (f"model.layers.{i}.self_attn.k_proj.weight" in names) == producer
        assert (f"model.layers.{i}.kv_input_layernorm.weight" in names) == (producer and kvnorm)
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    back = load_model_dir(out)
    golden = load_file(str(out / "golden.safetensors"))
    assert golden["input_ids"].dtype == torch.int64 and golden["input_ids"][0].item() == 0
    assert golden["logits"].shape == (32, 4096) and golden["logits"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(back(golden["input_ids"]), golden["logits"], rtol=0, atol=0)
        torch.testing.assert_close(model(golden["input_ids"]), golden["logits"], rtol=1e-6, atol=1e-6)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["kv_source_layers"] == sharing_map(sharing, 4)
    assert (out / "tokenizer.json").read_bytes() == ASSET.read_bytes()
    assert len(info["greedy_new_ids"]) == 32
    from safetensors import safe_open

    with safe_open(str(out / "golden.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["greedy_new_ids"]) == info["greedy_new_ids"]


def test_tiny_training_run(tiny_corpus, tmp_path):
    prepare_data(tiny_corpus, tmp_path / "data")
    args = parser().parse_args([
        "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu",
        "--arch", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                              "sharing": "cla2", "kv_input_layernorm": True}),
        "--context", "32", "--batch-size", "4", "--tokens", str(40 * 4 * 32), "--lr", "3e-3", "--evals", "2",
        "--eval-windows", "4",
    ])
    m = Trainer(args).run()
    assert m["status"] == "done" and m["steps"] == 40 and m["tokens_trained"] == 40 * 128
    assert m["params"] == m["params_formula"]
    assert m["config"]["kv_source_layers"] == [0, 0]
    assert m["log"][-1]["loss"] < m["log"][0]["loss"]
    assert m["final"]["complete"] and m["val_ppl"] == m["final"]["ppl"]
    assert len(m["val"]) >= 2
    # The saved model reproduces the reported validation perplexity.
    model = load_model_dir(tmp_path / "run" / "final")
    val = torch.from_numpy(np.load(tmp_path / "data" / "val_ids.npy").astype(np.int64))
    assert math.isclose(perplexity(model, val, 32)["ppl"], m["val_ppl"], rel_tol=1e-5)
    # Same seed -> same result.
    args.out = tmp_path / "run2"
    m2 = Trainer(args).run()
    assert m2["val_ppl"] == pytest.approx(m["val_ppl"], rel=1e-6)
