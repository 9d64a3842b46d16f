"""The child processes of bench/full_scale.py (one per stage, so each stage's memory is its own).

    build   the random checkpoint in the hub cache layout (bench/hub_checkpoint.py)
    reload  the exported artifact through plain transformers + peft and through idengine's loader: logit difference
    step    seconds per optimizer step of `train/loop.train_epoch` at one batch x length, base dtype and checkpointing

Each writes `<work>/results/<name>.json`; full_scale.py collects them. Run by full_scale.py, not by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from hub_checkpoint import HUB_SHARD_BYTES, random_masked_lm, write_hub_checkpoint  # noqa: E402

HUB_ID = "InstaDeepAI/nucleotide-transformer-2.5b-multi-species"
SPECIES_12S = 1377
"""Species of the full 12s-fish set (>= 5 distinct sequences): the head size of the step measurements."""


def write_result(work: Path, name: str, result: dict) -> None:
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{name}.json").write_text(json.dumps(result, indent=1))


def stage_build(args) -> None:
    """The random 2.5B (or tiny) EsmForMaskedLM as two pickled shards + index + tokenizer under the hub id."""
    import torch

    start = time.perf_counter()
    model = random_masked_lm(full_size=not args.tiny)
    build_s = time.perf_counter() - start
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    written = write_hub_checkpoint(Path(args.hf_home) / "hub", HUB_ID, model,
                                   max_shard_bytes=int(total * 0.97) if args.tiny else HUB_SHARD_BYTES)
    write_result(Path(args.work), "build", {"build_s": round(build_s, 1), "write_s": written["seconds"],
                                            "parameters": written["parameters"], "shards": written["shards"],
                                            "fp32_bytes": total, "torch_threads": torch.get_num_threads()})


def stage_reload(args) -> None:
    """Plain transformers + peft (as deploy/export.py's docstring shows) against idengine's loader, same sequences."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, EsmForSequenceClassification

    from idengine.data.fasta import read_fasta
    from idengine.deploy.artifact import clean_for_model, load_artifact

    work, device = Path(args.work), "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = work / "model"
    manifest = json.loads((model_dir / "idengine.json").read_text())
    id2label = {e["label"]: e["species"] for e in json.loads((model_dir / "label_map.json").read_text())["labels"]}
    start = time.perf_counter()
    artifact = load_artifact(model_dir, device=device)
    ours_load_s = time.perf_counter() - start
    sequences = clean_for_model(read_fasta(work / "data" / "predict.fasta")[0]["sequence"].tolist(), artifact.config)
    start = time.perf_counter()
    ours = artifact.logits(sequences, batch_size=8)
    ours_s = time.perf_counter() - start
    max_tokens = artifact.config.model.max_tokens
    del artifact
    gc.collect()  # one 10 GB model at a time
    start = time.perf_counter()
    base = EsmForSequenceClassification.from_pretrained(
        manifest["base_model"]["id"], revision=manifest["base_model"]["revision"], num_labels=len(id2label),
        id2label=id2label, use_safetensors=False)  # the published base is pickled .bin only: a trusted source
    model = PeftModel.from_pretrained(base, str(model_dir)).to(device).eval()
    plain_load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tokenizer(sequences, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        plain = model(**batch.to(device)).logits.float().cpu().numpy()
    plain_s = time.perf_counter() - start
    write_result(work, "reload", {
        "sequences": len(sequences), "device": device, "max_abs_logit_diff": float(np.abs(plain - ours).max()),
        "max_abs_logit": float(np.abs(ours).max()), "argmax_agreement": float(np.mean(plain.argmax(1) ==
                                                                                      ours.argmax(1))),
        "plain_load_s": round(plain_load_s, 1), "plain_forward_s": round(plain_s, 1),
        "idengine_load_s": round(ours_load_s, 1), "idengine_forward_s": round(ours_s, 1),
        "idengine_forward_seqs_per_s": round(len(sequences) / ours_s, 2)})


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters of a LoRA model: the adapters and the head (peft modules_to_save) apart."""
    params = list(model.named_parameters())
    lora = sum(p.numel() for n, p in params if p.requires_grad and "lora_" in n)
    head = sum(p.numel() for n, p in params if p.requires_grad and "modules_to_save" in n)
    trained = sum(p.numel() for _, p in params if p.requires_grad)
    return {"lora": lora, "head": head, "trainable": trained, "total": sum(p.numel() for _, p in params)}


def saved_bytes_hooks(counter: dict, model):
    """saved_tensors_hooks that add up the distinct tensors autograd keeps for backward (the activation memory;
    weights that backward reuses are not counted)."""
    import torch

    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            counter["bytes"] += tensor.untyped_storage().nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def rss_gb() -> float:
    """This process's resident memory now (the stage's peak over time is sampled by full_scale.py)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 1e9, 2)


def step_batch(batch_size: int, tokens: int, num_labels: int) -> dict:
    """A batch of random token ids (CLS first, no padding) and labels: the cost depends only on its shape."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(4, 4100, size=(batch_size, tokens)))
    ids[:, 0] = 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(rng.integers(0, num_labels, size=batch_size))}


def stage_step(args) -> None:
    """Load the model as the production config does, one eval forward, then `args.steps` optimizer steps."""
    import numpy as np
    import torch

    from idengine.config_io import load_config
    from idengine.models.inference import forward_logits
    from idengine.models.transformer import build_model
    from idengine.train.loop import build_optimizer, build_scheduler, grad_scaler_for, train_epoch

    for name in ("peft", "transformers"):  # imported before the clock starts: load_s is the checkpoint's cost
        importlib.import_module(name)

    work, device = Path(args.work), torch.device("cpu")
    config = load_config(args.config, [*args.overrides, f"model.base_dtype={args.base_dtype}",
                                       f"model.gradient_checkpointing={str(args.ckpt).lower()}"])
    id2label = {i: f"species {i}" for i in range(SPECIES_12S)}
    start = time.perf_counter()
    model = build_model(config.model, config.lora, len(id2label), id2label, seed=0)
    load_s = time.perf_counter() - start
    batch = step_batch(args.batch, args.tokens, len(id2label))
    start = time.perf_counter()
    with torch.no_grad():
        logits = forward_logits(model.eval(), batch, device, None)
    forward_s = time.perf_counter() - start
    cfg = dataclasses.replace(config.train, warmup_fraction=0.0)
    optimizer = build_optimizer(model, cfg)
    scheduler, scaler = build_scheduler(optimizer, cfg, args.steps), grad_scaler_for(model, None, device)
    steps, counter, rss_after_load = [], {"bytes": 0}, rss_gb()
    for i in range(args.steps):
        with saved_bytes_hooks(counter, model) if i == 0 and not args.ckpt else contextlib.nullcontext():
            stats = train_epoch(model, [batch], optimizer, scheduler, cfg, None, device, None, scaler, max_steps=1)
        steps.append({"seconds": round(stats["seconds"], 1), "loss": stats["loss"]})
    trained_finite = all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    write_result(work, args.name, {
        "base_dtype": args.base_dtype, "gradient_checkpointing": args.ckpt, "batch": args.batch,
        "tokens": args.tokens, "load_s": round(load_s, 1), "eval_forward_s": round(forward_s, 1), "steps": steps,
        "finite": bool(np.isfinite([s["loss"] for s in steps]).all() and torch.isfinite(logits).all() and
                       trained_finite),
        # a GradScaler that met inf/NaN gradients skips the step and halves its scale (from 65536)
        "grad_scaler_scale": None if scaler is None else float(scaler.get_scale()),
        "rss_after_load_gb": rss_after_load, "rss_after_steps_gb": rss_gb(),
        "saved_activation_bytes": None if args.ckpt else counter["bytes"],
        "frozen_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters()  # peft's frozen copy of the
                                 if not p.requires_grad and ".original_module." not in n}),  # head stays fp32
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "parameters": trainable_counts(model), "torch_threads": torch.get_num_threads()})


ACTIVATION_CASES = (("fp32", None), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", None), ("bf16", "bf16"),
                    ("fp16", None), ("fp16", "fp16"))
"""(base_dtype, autocast dtype) pairs of stage_activations: the CPU runs fp32; a GPU runs an autocast row."""


def saved_bytes(model, batch: dict, autocast: str | None) -> dict[str, int]:
    """Bytes autograd keeps from one training forward, split into activations and cast copies of weights (under
    autocast a frozen fp32 weight is cast for each matmul, and backward needs that copy)."""
    import torch

    from idengine.models.inference import forward_logits

    shapes = {tuple(p.shape) for p in model.parameters()}
    seen, out = {p.untyped_storage().data_ptr() for p in model.parameters()}, {"activations": 0, "weight_copies": 0}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out["weight_copies" if tuple(tensor.shape) in shapes else "activations"] += \
                tensor.untyped_storage().nbytes()
        return tensor

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_logits(model.train(), batch, torch.device("cpu"), dtype)
    return out


def stage_activations(args) -> None:
    """Saved bytes per token per layer of the 2.5B's layer (full width, 1 and 2 layers: the difference is one layer),
    built by build_model as production builds it, for each ACTIVATION_CASES pair; forward only (bytes, not time)."""
    from transformers import EsmForMaskedLM

    from hub_checkpoint import nt_config
    from idengine.config_io import load_config
    from idengine.data.tokenize import write_offline_tokenizer
    from idengine.models.transformer import build_model

    work, rows, per_layer = Path(args.work), [], {}
    for layers in (1, 2):
        directory = work / "activations" / f"layers{layers}"
        config = nt_config(full_size=True)
        config.num_hidden_layers = layers
        EsmForMaskedLM(config).save_pretrained(str(directory))  # safetensors: loads as any local backbone
        write_offline_tokenizer(directory)
        for base_dtype, autocast in ACTIVATION_CASES:
            cfg = load_config(args.config, [*args.overrides, f"model.backbone={directory}",
                                            f"model.base_dtype={base_dtype}", "model.gradient_checkpointing=false"])
            model = build_model(cfg.model, cfg.lora, SPECIES_12S, {i: f"s{i}" for i in range(SPECIES_12S)})
            per_layer[(layers, base_dtype, autocast)] = saved_bytes(model, step_batch(args.batch, args.tokens,
                                                                                      SPECIES_12S), autocast)
            del model
    tokens = args.batch * args.tokens
    for base_dtype, autocast in ACTIVATION_CASES:
        one, two = per_layer[(1, base_dtype, autocast)], per_layer[(2, base_dtype, autocast)]
        rows.append({"base_dtype": base_dtype, "autocast": autocast, "batch": args.batch, "tokens": args.tokens,
                     "activation_bytes_per_token_per_layer": round((two["activations"] - one["activations"]) / tokens),
                     "weight_copy_bytes_per_layer": two["weight_copies"] - one["weight_copies"],
                     "outside_layers_bytes_per_token": round((2 * one["activations"] - two["activations"]) / tokens)})
    write_result(work, args.name, {"cases": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["build", "reload", "step", "activations"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--hf-home", help="build: the throwaway HF_HOME to write the checkpoint into")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--name", default="step")
    parser.add_argument("--config", default=str(REPO / "jobs" / "configs" / "nt2.5b-1gpu.yaml"))
    parser.add_argument("--base-dtype", default="fp32")
    parser.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override (repeat)")
    args = parser.parse_args()
    stages = {"build": stage_build, "reload": stage_reload, "step": stage_step, "activations": stage_activations}
    stages[args.stage](args)


if __name__ == "__main__":
    main()
