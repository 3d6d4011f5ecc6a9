"""Atomic checkpoint files and the loading of a checkpoint back into a model."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from train.models import Classifier, check_arch, check_tta, create_model
from train.preprocess import Preprocessing

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    pass


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through cellcore.files.atomic_write: a kill mid-save leaves the previous checkpoint intact."""
    from cellcore.files import atomic_write

    atomic_write(path, lambda fh: torch.save(obj, fh))


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


def model_from_checkpoint(ckpt: dict, path: Path | str = "<checkpoint>",
                          tta: str = "none") -> tuple[Classifier, Preprocessing, list[str]]:
    """Rebuild the exact network; a state dict of another architecture or class count is refused clearly.

    `tta`: the export's test-time augmentation (manifest model.tta), so a PyTorch reference computes what the
    exported graph does."""
    arch = ckpt["arch"]
    try:
        check_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    classes = list(ckpt["classes"])
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    model = create_model(arch, len(classes), prep.mean, prep.std, prep.input_norm)
    model.tta = check_tta(tta)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not fit {arch} with {len(classes)} classes "
                              f"({' '.join(first)})") from exc
    model.eval()
    return model, prep, classes


def snapshot(obj):
    """A copy of a checkpoint's contents with every tensor cloned to the CPU, detached from live training state.

    state_dict() tensors alias the live parameters and optimizer moments; a checkpoint written on another
    thread while the next epoch trains must hold a copy taken now (one device-to-host copy per tensor).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs file-writing jobs (checkpoints, metrics, plots) in order on one thread, off the training loop.

    At most `max_pending` jobs wait (the next submit blocks beyond that, bounding the memory held by
    snapshots). Each job's writes are atomic on their own (save_atomic, atomic_write_text), so a kill at any
    moment leaves every file whole: the previous epoch's or the new one's. An error in a job is raised in the
    caller at its next submit() or at close(); close() returns once every submitted job has run.
    """

    def __init__(self, max_pending: int = 1, name: str = "checkpoint-writer"):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure the rest is skipped: the caller is told at once
                    fn, args = job
                    fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the training thread, which re-raises it
                self._error = exc
            finally:
                self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing checkpoints/metrics failed: {err}") from err

    def submit(self, fn, *args) -> None:
        self._check()
        if not self._thread.is_alive():
            raise RuntimeError("the checkpoint writer is closed")
        self._queue.put((fn, args))

    def flush(self) -> None:
        """Wait until every submitted job has run; raise the first error of any."""
        self._queue.join()
        self._check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()
