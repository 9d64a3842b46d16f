"""Training checkpoints: only the trainable weights (adapter + head, never the base), optimizer state, progress and
the resolved config, as the files `layout.CHECKPOINT_FILES` names.

`train/loop.py` writes one per epoch on the chief worker and `train/ray_train.py` hands it to Ray Train, which
persists it to `train.storage_path` and gives it back on resume. Everything else reads a checkpoint through the
functions here (`read_best_weights`, `read_progress`), never by its file names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from idengine import layout as L
from idengine.models.transformer import load_trainable_state, trainable_state_dict


@dataclass
class TrainState:
    """JSON-serialisable progress of a training run; epochs are counted from 1 (`best_epoch` -1: none yet)."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
    best_state: dict[str, torch.Tensor], best_eval_logits: np.ndarray, config_yaml: str,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a resumable checkpoint holding only trainable parameters (never the base model).

    Files: the latest and the best epoch's trainable weights (safetensors), the best epoch's evaluation logits,
    optimizer/scheduler/fp16-scaler state (written and read back only by idengine, `weights_only`), the progress
    (TrainState as JSON) and the resolved config the run was started with (YAML).
    """
    (out := Path(directory)).mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(out / L.CKPT_TRAINABLE))
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(out / L.CKPT_BEST))
    np.save(out / L.CKPT_BEST_LOGITS, np.asarray(best_eval_logits, dtype=np.float32), allow_pickle=False)
    scaler_state = scaler.state_dict() if scaler is not None else None
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler_state},
               out / L.CKPT_OPTIMIZER)
    (out / L.CKPT_STATE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    (out / L.CKPT_CONFIG).write_text(config_yaml, encoding="utf-8")
    return out


def load_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[TrainState, dict[str, torch.Tensor], np.ndarray]:
    """Restore a `save_checkpoint` directory into a model/optimizer/scheduler built the same way.

    Returns (state, best_state, best_eval_logits); raises FileNotFoundError when a checkpoint file is missing.
    """
    src = Path(directory)
    missing = [name for name in L.CHECKPOINT_FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {src} lacks {missing}; it was not written by save_checkpoint")
    load_trainable_state(model, load_file(str(src / L.CKPT_TRAINABLE)))
    best_state = load_file(str(src / L.CKPT_BEST))
    state, best_eval_logits = read_progress(src)
    saved = torch.load(src / L.CKPT_OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return state, best_state, best_eval_logits


def read_progress(directory: str | Path) -> tuple[TrainState, np.ndarray]:
    """A local checkpoint directory's progress (TrainState) and its best epoch's evaluation logits."""
    src = Path(directory)
    state = TrainState(**json.loads((src / L.CKPT_STATE).read_text(encoding="utf-8")))
    return state, np.load(src / L.CKPT_BEST_LOGITS, allow_pickle=False)


def read_best_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """The best epoch's trainable weights of a checkpoint directory, local or on s3:// / gs:// (pyarrow.fs)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(checkpoint) if "://" in checkpoint else \
        (fs.LocalFileSystem(), checkpoint)
    with filesystem.open_input_stream(f"{path.rstrip('/')}/{L.CKPT_BEST}") as stream:
        return load(stream.read())
