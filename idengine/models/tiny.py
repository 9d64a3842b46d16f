"""The `tiny` backbone: the 2.5B Nucleotide Transformer's architecture at toy size, random weights from a fixed seed.

It needs no download, so CPU tests, the bundled example and CI run the real transformer code path on it. Its
accuracy says nothing about a pretrained backbone's.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SEED = 0
"""The tiny backbone's weights are always drawn from this seed, so every process rebuilds the same base."""


def tiny_config(**labels):
    """EsmConfig of the 2.5B NT (absolute positions, token dropout, pad 1, mask 2, 1000 tokens) at toy size.

    vocab_size is 4105 as in the real model: ids 4105/4106 (`<eos>`, `<bos>`) never occur because the tokenizer
    adds no EOS. Token dropout only rescales embeddings by a constant 0.88 when no `<mask>` is present (the same in
    training and evaluation), so it is kept as in the real model.

    Args:
        **labels: num_labels, id2label, label2id for a classification config.
    """
    from transformers import EsmConfig

    return EsmConfig(
        vocab_size=4105,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1002,
        position_embedding_type="absolute",
        pad_token_id=1,
        mask_token_id=2,
        token_dropout=True,
        emb_layer_norm_before=False,
        layer_norm_eps=1e-12,
        **labels,
    )


def tiny_masked_lm():
    """The tiny backbone as an EsmForMaskedLM (the class NT checkpoints are saved as), seeded with TINY_SEED."""
    from transformers import EsmForMaskedLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return EsmForMaskedLM(tiny_config())


def save_tiny_backbone(out_dir: str | Path) -> Path:
    """Write the tiny backbone as a checkpoint dir (config.json, model.safetensors, NT tokenizer files).

    `build_model` on this directory goes through the same `from_pretrained` path as a real checkpoint and gives
    the same weights as backbone `tiny`.

    Args:
        out_dir: directory to write (created if needed).

    Returns:
        out_dir as a Path.
    """
    from idengine.data.tokenize import write_offline_tokenizer

    out = Path(out_dir)
    tiny_masked_lm().save_pretrained(str(out), safe_serialization=True)
    write_offline_tokenizer(out)
    return out
