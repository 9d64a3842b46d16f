"""Step 7a, transformer: a Nucleotide Transformer (ESM) backbone + a new classification head, adapted with LoRA (peft).

`build_model` gives the module the training loop trains; `trainable_state_dict` / `load_trainable_state` move only
what training changed (adapter + head), never the multi-GB base. `load_backbone` gives the frozen headless backbone
the probe embeds with. Both load checkpoints through `from_pretrained`, the one place that decides which checkpoints
may be unpickled, and both keep the frozen base in `model.base_dtype` (the trained LoRA and head weights stay fp32).
Backbone `tiny` (models/tiny.py) is a random model of the same architecture for CPU tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from idengine.config import DEFAULT_BACKBONE, TINY_BACKBONE, LoraSettings, ModelConfig
from idengine.errors import InputError
from idengine.models.tiny import tiny_config, tiny_masked_lm

log = logging.getLogger(__name__)

# Checkpoints we trust to unpickle: InstaDeepAI publishes the 2.5B NT only as pickled `.bin` shards.
PICKLE_TRUSTED_BACKBONES = (DEFAULT_BACKBONE,)
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
"""The names under which transformers looks for pickled weights (an index names its `.bin` shards)."""
BASE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`model.base_dtype` -> the torch dtype the frozen base is loaded in."""


def base_torch_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype of the frozen base weights (`model.base_dtype`); trained weights are always fp32."""
    return BASE_TORCH_DTYPES[model_cfg.base_dtype]


def from_pretrained(model_cls, model_cfg: ModelConfig, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained(model_cfg.backbone, ...)` under idengine's one rule on pickles, in `base_dtype`.

    Unpickling can run code: pickled `.bin` shards are read only for checkpoints named as trusted
    (PICKLE_TRUSTED_BACKBONES: InstaDeepAI publishes the 2.5B NT only so); every other backbone must ship safetensors.

    Raises:
        InputError: an untrusted checkpoint has pickled weights only (the message says how to convert it).
        OSError: transformers' own error for a checkpoint that cannot be found or read.
    """
    trusted = model_cfg.backbone in PICKLE_TRUSTED_BACKBONES
    try:
        return model_cls.from_pretrained(
            model_cfg.backbone,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=not trusted,
            dtype=base_torch_dtype(model_cfg),  # the loop autocasts to bf16/fp16 on a GPU whatever this is
            **kwargs,
        )
    except OSError as err:
        pickles = [] if trusted else pickled_weight_files(model_cfg.backbone, model_cfg.revision)
        if pickles:
            raise InputError(pickle_refusal(model_cfg.backbone, model_cfg.revision, pickles)) from err
        raise


def pickled_weight_files(source: str, revision: str | None = None) -> list[str]:
    """The pickled weight files (PICKLED_WEIGHT_FILES, `.bin` shards) a local directory or hub checkpoint holds.

    A hub id is looked up in the local cache first, then (unless HF_HUB_OFFLINE) in the hub's file list; an
    unreachable hub gives [] (the caller then raises transformers' own error).
    """
    directory = Path(source)
    if directory.is_dir():
        names = [p.name for p in directory.iterdir()]
    else:
        from huggingface_hub import is_offline_mode, list_repo_files, try_to_load_from_cache

        names = [n for n in PICKLED_WEIGHT_FILES
                 if isinstance(try_to_load_from_cache(source, n, revision=revision), str)]
        if not names and not is_offline_mode():
            try:
                names = list_repo_files(source, revision=revision)
            except Exception:  # noqa: BLE001 - any hub failure: nothing more is known about this checkpoint
                names = []
    return sorted(n for n in names if n in PICKLED_WEIGHT_FILES or (n.startswith("pytorch_model") and
                                                                     n.endswith(".bin")))


def pickle_refusal(source: str, revision: str | None, pickles: list[str]) -> str:
    """Why an untrusted pickle-only checkpoint is refused, and the few lines that convert it to safetensors."""
    rev = f", revision={revision!r}" if revision else ""
    return (
        f"model.backbone={source}: this checkpoint has pickled PyTorch weights only ({', '.join(pickles[:3])}) and "
        "no safetensors. Unpickling a file can run any code, so idengine loads no pickle it did not write; the one "
        f"exception is the published {DEFAULT_BACKBONE} (hub id). If you trust this checkpoint, convert it once to "
        "safetensors and point model.backbone at the copy:\n"
        "    python -c \"from transformers import AutoModelForMaskedLM, AutoTokenizer; "
        f"src, out = {source!r}, 'nt-safetensors'; "
        f"AutoModelForMaskedLM.from_pretrained(src, use_safetensors=False{rev}).save_pretrained(out); "
        f"AutoTokenizer.from_pretrained(src{rev}).save_pretrained(out)\"\n"
        "then run with model.backbone=$PWD/nt-safetensors (save_pretrained writes model.safetensors; use AutoModel "
        "for a checkpoint without a masked-LM head)."
    )


def load_classifier(model_cfg: ModelConfig, num_labels: int, id2label: dict[int, str]) -> nn.Module:
    """EsmForSequenceClassification with the backbone's weights (in `base_dtype`) and a head still to be set."""
    from transformers import EsmForSequenceClassification

    labels = {"num_labels": num_labels, "id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    if model_cfg.backbone == TINY_BACKBONE:
        with torch.random.fork_rng(devices=[]):
            model = EsmForSequenceClassification(tiny_config(**labels))
        missing, _unexpected = model.load_state_dict(tiny_masked_lm().state_dict(), strict=False)
        if any(not k.startswith("classifier.") for k in missing):
            raise RuntimeError(f"tiny backbone misses weights {missing}")
        return model.to(base_torch_dtype(model_cfg))
    # ignore_mismatched_sizes: a checkpoint that already has a head of another size
    return from_pretrained(EsmForSequenceClassification, model_cfg, ignore_mismatched_sizes=True, **labels)


def load_backbone(model_cfg: ModelConfig) -> nn.Module:
    """The backbone without any head (an EsmModel for NT checkpoints), frozen, in eval mode, in `base_dtype` on the
    CPU (the embeddings are pooled in fp32 by models/inference.py)."""
    if model_cfg.backbone == TINY_BACKBONE:
        model = tiny_masked_lm().esm.to(base_torch_dtype(model_cfg))  # the same TINY_SEED weights as build_model's
    else:
        from transformers import AutoModel

        # ESM's pooler is untrained in NT checkpoints; the embeddings are pooled by models/inference.py instead
        model = from_pretrained(AutoModel, model_cfg, add_pooling_layer=False)
    model.requires_grad_(False)
    return model.eval()


def _head_inputs_to_fp32(_module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the fp32 head: a half-precision base hands it half hidden states (outside autocast)."""
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _head_to_fp32(model: nn.Module) -> None:
    """Keep the head in fp32 over a half base; the hook survives peft's copy of it (modules_to_save deep-copies)."""
    model.classifier.float()
    if half_base_dtype(model) is not None:
        model.classifier.register_forward_pre_hook(_head_inputs_to_fp32)


def half_base_dtype(model: nn.Module) -> torch.dtype | None:
    """fp16 or bf16 when the model's frozen weights are in half precision (`model.base_dtype`), else None."""
    dtypes = {p.dtype for p in unwrap(model).parameters() if not p.requires_grad}
    return next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)


def _reset_head(model: nn.Module, seed: int) -> None:
    """Draw a NEW head from `seed` (even when the checkpoint carried one), as ESM initialises Linear layers."""
    std = model.config.initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.classifier.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing needs no input grads, so it works with a frozen embedding (peft #899).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _add_lora(model: nn.Module, lora: LoraSettings, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        task_type="SEQ_CLS",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=["classifier"],
    )
    with torch.random.fork_rng(devices=[]):  # LoRA A is drawn at random: from `seed`, not the global RNG
        torch.manual_seed(seed)
        model = get_peft_model(model, peft_cfg)
    # peft moves adapters to their base layer's dtype and (autocast_adapter_dtype) back up to fp32; say it here, as
    # the optimizer, the GradScaler (it refuses fp16 gradients) and the checkpoints all rely on fp32 trained weights.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def build_model(
    model_cfg: ModelConfig, lora: LoraSettings, num_labels: int, id2label: dict[int, str], seed: int = 0
) -> nn.Module:
    """Backbone + new classification head, set up for `model_cfg.finetune` (lora, full or head).

    Args:
        model_cfg: backbone (hub id, local dir or `tiny`), revision, finetune mode, gradient checkpointing, and
            `base_dtype`: the frozen base's precision (fp32, bf16 or fp16; the head and LoRA stay fp32).
        lora: rank, alpha, dropout and target modules (used in `lora` mode).
        num_labels: number of classes of the head.
        id2label: class index -> species name, stored in the model config.
        seed: seed of the new head and of the LoRA matrices (the base comes from the checkpoint or TINY_SEED).

    Returns:
        A peft PeftModelForSequenceClassification (`lora`) or an EsmForSequenceClassification (`full`, `head`),
        in training mode, on the CPU. Only the parameters the mode trains have requires_grad, all of them fp32.

    Raises:
        InputError: `full` fine-tuning over a half-precision base (every weight trains, so every weight is fp32).
    """
    if model_cfg.finetune == "full" and model_cfg.base_dtype != "fp32":
        raise InputError(f"model.base_dtype={model_cfg.base_dtype} halves the FROZEN base, but model.finetune=full "
                         "trains every weight (kept in fp32): use model.finetune=lora or head, or model.base_dtype=fp32")
    model = load_classifier(model_cfg, num_labels, id2label)
    model.requires_grad_(False)  # until the mode below says what trains (half_base_dtype reads frozen weights)
    _head_to_fp32(model)
    _reset_head(model, seed)
    if model_cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if model_cfg.finetune == "lora":
        model = _add_lora(model, lora, seed)
    else:
        for name, param in model.named_parameters():
            # ESM's contact-prediction head is not in the classification forward: training it would leave
            # parameters without gradients, which DistributedDataParallel refuses (peft #951 is the LoRA twin).
            trains = name.startswith("classifier.") if model_cfg.finetune == "head" else \
                ".contact_head." not in f".{name}"
            param.requires_grad = trains
    trainable, total = count_parameters(model)
    log.info("model %s (%s, base %s): %d of %d parameters trainable", model_cfg.backbone, model_cfg.finetune,
             model_cfg.base_dtype, trainable, total)
    return model.train()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself), so state-dict keys never start `module.`."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; peft's frozen copy of the original head counts in total."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes (LoRA adapters + head, or all in `full` mode), detached CPU copies.

    Args:
        model: a model from build_model, possibly wrapped in DistributedDataParallel.

    Returns:
        Parameter name -> tensor, for every parameter with requires_grad.
    """
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in unwrap(model).named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state_dict` back into a model built the same way (strict: same names, same shapes).

    Args:
        model: a model from build_model with the same backbone, finetune mode, LoRA settings and labels.
        state: name -> tensor, as returned by trainable_state_dict.

    Raises:
        KeyError: the names differ from the model's trainable parameters (different mode, rank or targets).
        ValueError: a tensor's shape differs (e.g. another number of labels).
    """
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"trainable state does not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved with another finetune mode or LoRA setting?"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != model {tuple(param.shape)}")
            param.copy_(state[name])
