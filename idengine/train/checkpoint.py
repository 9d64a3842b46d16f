"""Fold checkpoints: only the trainable weights (adapter + head, never the base), optimizer state and progress.

A checkpoint directory holds CHECKPOINT_FILES; `train/loop.py` writes one per epoch on the chief worker and
`train/ray_train.py` hands it to Ray Train, which persists it to `train.storage_path` and gives it back on resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idengine.model import load_trainable_state, trainable_state_dict

CHECKPOINT_FILES = ("trainable.safetensors", "best.safetensors", "best_val_logits.npy", "optimizer.pt", "state.json")


@dataclass
class FoldState:
    """JSON-serialisable progress of a fold; epochs are counted from 1 (`best_epoch` -1: none yet)."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list[dict] = field(default_factory=list)



def save_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: FoldState,
    best_state: dict[str, torch.Tensor], best_val_logits: np.ndarray, scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a resumable fold checkpoint holding only trainable parameters (never the base model).

    Files: trainable.safetensors (latest), best.safetensors (best epoch), best_val_logits.npy,
    optimizer.pt (optimizer, scheduler and fp16 scaler state), state.json (FoldState).
    """
    (out := Path(directory)).mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(out / "trainable.safetensors"))
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(out / "best.safetensors"))
    np.save(out / "best_val_logits.npy", np.asarray(best_val_logits, dtype=np.float32), allow_pickle=False)
    scaler_state = scaler.state_dict() if scaler is not None else None
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler_state},
               out / "optimizer.pt")
    (out / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    return out


def load_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[FoldState, dict[str, torch.Tensor], np.ndarray]:
    """Restore a `save_checkpoint` directory into a model/optimizer/scheduler built the same way.

    Returns (state, best_state, best_val_logits); raises FileNotFoundError when a checkpoint file is missing.
    """
    src = Path(directory)
    missing = [name for name in CHECKPOINT_FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"fold checkpoint {src} lacks {missing}; it was not written by save_checkpoint")
    load_trainable_state(model, load_file(str(src / "trainable.safetensors")))
    best_state = load_file(str(src / "best.safetensors"))
    best_val_logits = np.load(src / "best_val_logits.npy", allow_pickle=False)
    saved = torch.load(src / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    state = FoldState(**json.loads((src / "state.json").read_text(encoding="utf-8")))
    return state, best_state, best_val_logits
