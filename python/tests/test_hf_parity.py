"""Parity with Hugging Face Llama: a plain (no sharing) model exported by us loads in
transformers' LlamaForCausalLM with the same logits, and a real HF Llama checkpoint loads in
our model with its published golden logits."""

import pytest
import torch

from cla_train.model import ClaConfig, ClaForCausalLM




@pytest.mark.parametrize("kv_heads,tied", [(4, True), (1, False), (2, True)])
def test_plain_model_matches_hf_llama(tmp_path, kv_heads, tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ClaConfig(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=kv_heads, head_dim=16, tie_word_embeddings=tied)  # q dim 64 != hidden 32
    model = ClaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    from cla_train.export import save_weights

    save_weights(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_loads_real_llama_and_matches_its_golden_logits():
    """The shared stories260K model (HF Llama, GQA, tied) loads through our loader and gives
    its published golden logits."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    root = Path(__file__).resolve().parents[2]
    model_dir = None
    for cand in (root / "shared" / "models" / "stories260K", root.parent / "shared" / "models" / "stories260K"):
        if (cand / "config.json").exists():
            model_dir = cand
            break
    if model_dir is None:
        pytest.skip("shared/models/stories260K not present")
    from cla_train.export import load_model_dir

    model = load_model_dir(model_dir)
    assert model.config.kv_source_layers == list(range(5))
    with safe_open(str(model_dir / "golden" / "logits_bos16.safetensors"), "pt") as f:
        ids = torch.tensor(json.loads(f.metadata()["input_ids"]))
        want = f.get_tensor("logits")
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
