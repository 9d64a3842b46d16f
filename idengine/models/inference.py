"""Step 7b, inference: the one forward loop over token rows, for a classifier's logits and a backbone's embeddings.

Rows are batched in length order, so a short amplicon is never padded to a full gene's length, and come back in input
order: the result depends only on the model and the rows, not on which caller runs it (cv, the final model, the probe,
an exported artifact, the bench).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from idengine.data.tokenize import PAD_ID, collate, tokenize_batch
from idengine.layout import INPUT_IDS, SEQUENCE

Batch = dict[str, torch.Tensor]


def forward_logits(model: nn.Module, batch: Batch, device: torch.device, autocast_dtype: torch.dtype | None
                   ) -> torch.Tensor:
    """The model's logits for one collated batch, under autocast when a dtype is given."""
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(
            input_ids=batch["input_ids"].to(device, non_blocking=True),
            attention_mask=batch["attention_mask"].to(device, non_blocking=True),
        )
    return out.logits


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`: None (fp32) on a CPU, bf16/fp16 on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def length_sorted_batches(lengths: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row positions in batches of similar length (longest first, stable), so padding costs little."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, L, H) last hidden states -> (B, H): mean over real tokens after CLS (position 0), or the CLS state."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.clone()
    mask[:, 0] = 0  # masked-LM pre-training gives CLS no summary task; NT issue #33 finds the two about equal
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def token_rows(tokenizer, sequences: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    """Token ids (CLS first, truncated to max_tokens) of cleaned sequences."""
    return list(tokenize_batch({SEQUENCE: np.array(list(sequences), dtype=object)}, tokenizer, max_tokens)[INPUT_IDS])


def sequence_logits(model: nn.Module, tokenizer, sequences: Sequence[str], max_tokens: int, batch_size: int = 64,
                    device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(n, num_labels) float32 logits of a classifier for cleaned sequences (tokenize, then classifier_logits)."""
    return classifier_logits(model, token_rows(tokenizer, sequences, max_tokens), batch_size, device, autocast_dtype)


def sequence_embeddings(backbone: nn.Module, tokenizer, sequences: Sequence[str], max_tokens: int,
                        batch_size: int = 64, pooling: str = "mean", device: torch.device | None = None,
                        autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(n, hidden) float32 pooled embeddings of a headless backbone for cleaned sequences."""
    return embed_rows(backbone, token_rows(tokenizer, sequences, max_tokens), batch_size, pooling, device,
                      autocast_dtype)


def classifier_logits(model: nn.Module, rows: Sequence[np.ndarray], batch_size: int,
                      device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(len(rows), num_labels) float32 logits of a classifier for unpadded token-id rows, in their order."""
    return run_rows(model, rows, batch_size, model.config.num_labels, None, device, autocast_dtype)


def embed_rows(backbone: nn.Module, rows: Sequence[np.ndarray], batch_size: int, pooling: str = "mean",
               device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(len(rows), hidden) float32 pooled embeddings of a headless backbone for token-id rows, in their order."""
    return run_rows(backbone, rows, batch_size, backbone.config.hidden_size, pooling, device, autocast_dtype)


@torch.inference_mode()
def run_rows(model: nn.Module, rows: Sequence[np.ndarray], batch_size: int, width: int, pooling: str | None = None,
             device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Forward unpadded token-id rows (CLS first) through a model in eval mode, length-sorted batches.

    Args:
        model: a classifier (its logits are returned) or, with `pooling`, a headless backbone (its pooled last
            hidden states are returned); already on `device`.
        rows: token ids per record; batch_size: rows per forward pass.
        width: columns of the output (num_labels for a classifier, hidden_size for a backbone).
        pooling: None for a classifier; `mean` or `cls` for a backbone.
        device, autocast_dtype: where the model is (the CPU when None); bf16/fp16 autocast on a GPU, or None.

    Returns:
        (len(rows), width) float32 in the order of `rows`.
    """
    device = device or torch.device("cpu")
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = PAD_ID if pad_id is None else pad_id
    was_training = model.training
    model.eval()
    out = np.zeros((len(rows), width), dtype=np.float32)
    for idx in length_sorted_batches([len(r) for r in rows], batch_size):
        batch = collate({INPUT_IDS: [rows[i] for i in idx]}, pad_id=pad_id)
        if pooling is None:
            values = forward_logits(model, batch, device, autocast_dtype)
        else:
            mask = batch["attention_mask"].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
            values = pool_hidden(hidden.float(), mask, pooling)
        out[idx] = values.float().cpu().numpy()
    model.train(was_training)
    return out
