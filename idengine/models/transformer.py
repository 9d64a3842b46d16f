"""Step 7a, transformer: a Nucleotide Transformer (ESM) backbone + a new classification head, adapted with LoRA (peft).

`build_model` gives the module the training loop trains; `trainable_state_dict` / `load_trainable_state` move only
what training changed (adapter + head), never the multi-GB base. `load_backbone` gives the frozen headless backbone
the probe embeds with. Both load checkpoints through `from_pretrained`, the one place that decides which checkpoints
may be unpickled. Backbone `tiny` (models/tiny.py) is a random model of the same architecture for CPU tests.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from idengine.config import DEFAULT_BACKBONE, TINY_BACKBONE, LoraSettings, ModelConfig
from idengine.models.tiny import tiny_config, tiny_masked_lm

log = logging.getLogger(__name__)

# Checkpoints we trust to unpickle: InstaDeepAI publishes the 2.5B NT only as pickled `.bin` shards.
PICKLE_TRUSTED_BACKBONES = (DEFAULT_BACKBONE,)


def from_pretrained(model_cls, model_cfg: ModelConfig, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained(model_cfg.backbone, ...)` under idengine's one rule on pickles.

    Unpickling can run code: pickled `.bin` shards are read only for checkpoints named as trusted
    (PICKLE_TRUSTED_BACKBONES: InstaDeepAI publishes the 2.5B NT only so); every other backbone must ship safetensors,
    and a checkpoint that has none is refused by transformers with a message naming the missing file.
    """
    return model_cls.from_pretrained(
        model_cfg.backbone,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=model_cfg.backbone not in PICKLE_TRUSTED_BACKBONES,
        dtype=torch.float32,  # fp32 master weights; the loop autocasts to bf16/fp16 on a GPU
        **kwargs,
    )


def load_classifier(model_cfg: ModelConfig, num_labels: int, id2label: dict[int, str]) -> nn.Module:
    """EsmForSequenceClassification with the backbone's weights and a classification head still to be set."""
    from transformers import EsmForSequenceClassification

    labels = {"num_labels": num_labels, "id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    if model_cfg.backbone == TINY_BACKBONE:
        with torch.random.fork_rng(devices=[]):
            model = EsmForSequenceClassification(tiny_config(**labels))
        missing, _unexpected = model.load_state_dict(tiny_masked_lm().state_dict(), strict=False)
        if any(not k.startswith("classifier.") for k in missing):
            raise RuntimeError(f"tiny backbone misses weights {missing}")
        return model
    # ignore_mismatched_sizes: a checkpoint that already has a head of another size
    return from_pretrained(EsmForSequenceClassification, model_cfg, ignore_mismatched_sizes=True, **labels)


def load_backbone(model_cfg: ModelConfig) -> nn.Module:
    """The backbone without any head (an EsmModel for NT checkpoints), frozen, in eval mode, fp32 on the CPU."""
    if model_cfg.backbone == TINY_BACKBONE:
        model = tiny_masked_lm().esm  # the same TINY_SEED weights build_model starts from
    else:
        from transformers import AutoModel

        # ESM's pooler is untrained in NT checkpoints; the embeddings are pooled by models/inference.py instead
        model = from_pretrained(AutoModel, model_cfg, add_pooling_layer=False)
    model.requires_grad_(False)
    return model.eval()


def _reset_head(model: nn.Module, seed: int) -> None:
    """Draw a NEW head from `seed` (even when the checkpoint carried one), as ESM initialises Linear layers."""
    std = model.config.initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.classifier.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)


def build_model(
    model_cfg: ModelConfig, lora: LoraSettings, num_labels: int, id2label: dict[int, str], seed: int = 0
) -> nn.Module:
    """Backbone + new classification head, set up for `model_cfg.finetune` (lora, full or head).

    Args:
        model_cfg: backbone (hub id, local dir or `tiny`), revision, finetune mode, gradient checkpointing.
        lora: rank, alpha, dropout and target modules (used in `lora` mode).
        num_labels: number of classes of the head.
        id2label: class index -> species name, stored in the model config.
        seed: seed of the new head and of the LoRA matrices (the base comes from the checkpoint or TINY_SEED).

    Returns:
        A peft PeftModelForSequenceClassification (`lora`) or an EsmForSequenceClassification (`full`, `head`),
        in training mode, on the CPU. Only the parameters the mode trains have requires_grad.
    """
    model = load_classifier(model_cfg, num_labels, id2label)
    _reset_head(model, seed)
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it works with a frozen embedding (peft #899).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if model_cfg.finetune == "lora":
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
    elif model_cfg.finetune == "head":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    else:
        for name, param in model.named_parameters():
            # ESM's contact-prediction head is not in the classification forward: training it would leave
            # parameters without gradients, which DistributedDataParallel refuses (peft #951 is the LoRA twin).
            param.requires_grad = ".contact_head." not in f".{name}"
    trainable, total = count_parameters(model)
    log.info("model %s (%s): %d of %d parameters trainable", model_cfg.backbone, model_cfg.finetune, trainable, total)
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
