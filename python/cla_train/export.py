"""Export a trained model to the directory format the Rust engine loads, plus golden outputs.

A model directory holds:

* ``config.json``      HF Llama-style keys plus ``kv_source_layers`` (see model.ClaConfig).
* ``model.safetensors`` float32 tensors with HF Llama names; consumer layers have no
  ``k_proj``/``v_proj``; producers may have ``kv_input_layernorm``; no ``lm_head.weight``
  when the head is tied to the embedding.
* ``tokenizer.json``   the byte-level BPE tokenizer (no post-processor: nothing is added).
* ``golden.safetensors`` tensors ``input_ids`` (int64 [T]) and ``logits`` (float32 [T, vocab]):
  the model's logits for a fixed input (BOS followed by the first T-1 tokens of the
  validation text), computed in float32 on the CPU. Its metadata (and ``golden.json``) also
  hold a greedy continuation: ``greedy_prompt_ids`` (BOS + the tokens of a fixed prompt) and
  ``greedy_new_ids`` (argmax decoding with the full prefix recomputed at every step), with
  the top-1/top-2 logit margin of each step so that near-ties can be recognised.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ClaConfig, ClaForCausalLM, load_state
from .tokenizer import encode, load_tokenizer, special_ids

GOLDEN_LEN = 32
GREEDY_PROMPT = "It is a truth universally acknowledged, that"
GREEDY_NEW = 32


def save_weights(model: ClaForCausalLM, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(out_dir / "config.json")
    save_file(model.export_state_dict(), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def load_model_dir(model_dir: Path) -> ClaForCausalLM:
    model_dir = Path(model_dir)
    cfg = ClaConfig.load(model_dir / "config.json")
    model = ClaForCausalLM(cfg)
    load_state(model, load_file(str(model_dir / "model.safetensors")))
    model.eval()
    return model


@torch.no_grad()
def greedy(model: ClaForCausalLM, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    ids = list(prompt_ids)
    new, margins = [], []
    for _ in range(n_new):
        logits = model(torch.tensor(ids, dtype=torch.long))[-1]
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        new.append(nxt)
        ids.append(nxt)
    return new, margins


@torch.no_grad()
def write_golden(model: ClaForCausalLM, tokenizer_path: Path, val_text: str, out_dir: Path,
                 golden_len: int = GOLDEN_LEN, prompt: str = GREEDY_PROMPT, n_new: int = GREEDY_NEW) -> dict:
    """Writes golden.safetensors and golden.json; the model is evaluated in float32 on CPU."""
    tok = load_tokenizer(tokenizer_path)
    bos, _ = special_ids(tok)
    cpu = ClaForCausalLM(model.config)
    load_state(cpu, model.export_state_dict())
    cpu.eval()
    input_ids = [bos] + encode(tok, val_text)[: golden_len - 1]
    x = torch.tensor(input_ids, dtype=torch.long)
    logits = cpu(x).float().contiguous()
    prompt_ids = [bos] + encode(tok, prompt)
    new_ids, margins = greedy(cpu, prompt_ids, n_new)
    info = {
        "format": "cla-golden-v1",
        "input_ids": input_ids,
        "input_text": tok.decode(input_ids[1:]),
        "logits_shape": list(logits.shape),
        "computed": "float32 on CPU, no autocast, whole sequence in one forward pass",
        "greedy_prompt": prompt,
        "greedy_prompt_ids": prompt_ids,
        "greedy_new_ids": new_ids,
        "greedy_text": tok.decode(new_ids),
        "greedy_min_top2_margin": min(margins) if margins else None,
        "greedy_top2_margins": margins,
    }
    meta = {k: json.dumps(v) for k, v in info.items()}
    save_file({"input_ids": x.to(torch.int64), "logits": logits}, str(Path(out_dir) / "golden.safetensors"), metadata=meta)
    (Path(out_dir) / "golden.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_model_dir(model: ClaForCausalLM, out_dir: Path, tokenizer_path: Path, val_text: str) -> dict:
    out_dir = Path(out_dir)
    save_weights(model, out_dir)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    return write_golden(model, out_dir / "tokenizer.json", val_text, out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Complete a model directory (config.json + model.safetensors, e.g. a run's "
        "final/ folder) with tokenizer.json and golden outputs, into --out."
    )
    ap.add_argument("--model", required=True, type=Path, help="directory with config.json and model.safetensors")
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--val-text", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    model = load_model_dir(args.model)
    info = export_model_dir(model, args.out, args.tokenizer, args.val_text.read_bytes().decode("utf-8"))
    print(json.dumps({k: info[k] for k in ("input_ids", "greedy_new_ids", "greedy_text")}))


if __name__ == "__main__":
    main()
