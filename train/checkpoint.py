"""Atomic checkpoint files and the loading of a checkpoint back into a model."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from train.models import Classifier, check_arch, create_model
from train.preprocess import Preprocessing

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    pass


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    for key in ("arch", "classes", "preprocessing", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' (not written by this project?)")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: Path | str = "<checkpoint>") -> tuple[Classifier, Preprocessing, list[str]]:
    """Rebuild the exact network; a state dict of another architecture or class count is refused clearly."""
    arch = ckpt["arch"]
    try:
        check_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    classes = list(ckpt["classes"])
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    model = create_model(arch, len(classes), prep.mean, prep.std, prep.input_norm)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not fit {arch} with {len(classes)} classes "
                              f"({' '.join(first)})") from exc
    model.eval()
    return model, prep, classes
