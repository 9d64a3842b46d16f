"""Bench helper: a random Nucleotide Transformer written as the Hugging Face hub cache holds the published one.

InstaDeepAI ships `nucleotide-transformer-2.5b-multi-species` as two pickled `.bin` shards + an index, and no hub is
reachable here, so `write_hub_checkpoint` lays out random weights exactly so under
`<cache>/models--<org>--<name>/snapshots/<rev>/` (config.json, `pytorch_model-0000{1,2}-of-00002.bin`,
`pytorch_model.bin.index.json`, the NT tokenizer files) with `refs/main` naming `<rev>`. With `hub_env` (HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE=1) `model.backbone=<hub id>` then loads it through idengine's real loading code.
transformers 5 writes safetensors even when asked for `.bin`, so the shards are written with `torch.save`.
Used by bench/full_scale.py, bench/gpu_check.py and tests/test_hub_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"
"""A commit-like snapshot name (the hub cache names snapshots by commit hash)."""
HUB_SHARD_BYTES = 10_000_000_000
"""transformers' old max_shard_size ("10GB"): gives the published 9.9 GB + 0.28 GB split of the 2.5B model."""
NT_2P5B_SIZES = {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 10240,
                 "tie_word_embeddings": False}
"""The public 2.5B config where it differs from idengine's tiny one (models/tiny.tiny_config has the rest)."""


def nt_config(full_size: bool):
    """EsmConfig of the 2.5B NT (2,547,801,226 parameters) or of idengine's tiny model of the same architecture."""
    from idengine.models.tiny import tiny_config

    config = tiny_config()
    if full_size:
        config.update(NT_2P5B_SIZES)
    config.architectures = ["EsmForMaskedLM"]
    return config


def random_masked_lm(full_size: bool, seed: int = 0, device: str = "cpu"):
    """A randomly initialised EsmForMaskedLM of that config, on the CPU (about 50 s and 10.3 GB RSS at full size on
    2 cores); `device="cuda"` draws the weights on the GPU (seconds) and then copies them to the CPU."""
    from transformers import EsmForMaskedLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = EsmForMaskedLM(nt_config(full_size))
    return model.to("cpu").eval()


def repo_dir(hub_cache: str | Path, repo_id: str) -> Path:
    """`<cache>/models--<org>--<name>`: where the hub cache keeps one repository."""
    return Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Parameter names in state-dict order, cut into shards of at most max_shard_bytes (at least one name each)."""
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def write_hub_checkpoint(hub_cache: str | Path, repo_id: str, model, max_shard_bytes: int = HUB_SHARD_BYTES,
                         revision: str = REVISION) -> dict:
    """Write `model` as pickled `.bin` shards + index + tokenizer in the hub cache layout; returns what was written.

    Args:
        hub_cache: the hub cache directory (HF_HUB_CACHE, `$HF_HOME/hub`).
        repo_id: the hub id to file it under, e.g. InstaDeepAI/nucleotide-transformer-2.5b-multi-species.
        model: an EsmForMaskedLM (see random_masked_lm).
        max_shard_bytes: shard size limit; the tiny model needs a small one to get two shards.
        revision: the snapshot's commit-like name, written to refs/main.

    Returns:
        {"snapshot": path, "shards": {file: bytes}, "seconds": write time, "parameters": count}.
    """
    from idengine.data.tokenize import write_offline_tokenizer

    start = time.perf_counter()
    root = repo_dir(hub_cache, repo_id)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(snapshot))
    state = model.state_dict()
    groups = _shards(state, max_shard_bytes)
    weight_map, sizes = {}, {}
    for i, names in enumerate(groups, start=1):
        file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({name: state[name].contiguous() for name in names}, snapshot / file)
        weight_map.update(dict.fromkeys(names, file))
        sizes[file] = (snapshot / file).stat().st_size
    total = sum(t.numel() * t.element_size() for t in state.values())
    (snapshot / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_offline_tokenizer(snapshot)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return {"snapshot": str(snapshot), "shards": sizes, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(t.numel() for t in state.values())}


def hub_env(hf_home: str | Path) -> dict[str, str]:
    """Environment that makes huggingface_hub / transformers use `hf_home` offline (set it before importing them,
    or in a child process: huggingface_hub reads these once, at import)."""
    hf_home = Path(hf_home)
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def apply_hub_env(hf_home: str | Path) -> None:
    """Point this process at `hf_home` offline, also when huggingface_hub is already imported (its constants are
    read at import, so they are set here too)."""
    env = hub_env(hf_home)
    os.environ.update(env)
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HOME, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = env["HF_HOME"], env["HF_HUB_CACHE"], True
