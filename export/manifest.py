"""manifest.json: the contract between export, verification, benchmarks and the app (schema and I/O).

Schema version 1 (every key below is written by `python -m export`):

{
  "schema_version": 1,
  "created_utc": "2026-11-25T18:00:00Z",
  "model":   {"arch": "mobilevit_xxs", "params": 951000, "epoch": 40, "run_dir": "runs/cpu",
              "checkpoint": "best.pt", "checkpoint_sha256": "..."},
  "classes": ["basophil", "eosinophil", ...],            # output index i <-> classes[i]
  "input":   {"name": "image", "shape": [1, 3, S, S], "dtype": "float32", "layout": "NCHW",
              "channel_order": "RGB", "value_range": [0.0, 1.0]},
  "preprocessing": {                                      # train.preprocess.Preprocessing.to_dict()
              "input_size": S, "resize": "center_square_crop_then_resize", "interpolation": "bilinear",
              "mean": [...], "std": [...], "normalization_in_model": true, ...,
              "app_steps": ["decode ...", ...]},          # what the app must do, in words
  "output":  {"name": "logits", "shape": [1, C], "meaning": "..."},
  "uncertainty": {"threshold": 0.8, "rule": "...", "target_accuracy": 0.99,
                  "val_accuracy_at_or_above": 0.995, "val_coverage": 0.93},
  "metrics": {"training": {"val_acc": ..., "val_macro_f1": ..., ...},
              "verify": {"<artifact file>": {"accuracy": ..., "macro_f1": ..., "agreement": ...}}},
  "dataset": {"name": "pbc_dev", "fingerprint": "...", "train_counts": {...}, "class_map": null},
  "artifacts": [{"file": "mobilevit_xxs_onnx_fp32.onnx", "format": "onnx", "precision": "fp32",
                 "runtime": "onnxruntime", "batch": "dynamic", "input": "image", "output": "logits",
                 "output_kind": "logits", "size_bytes": 123, "sha256": "..."}, ...],
  "tools":   {"torch": "2.14.1", "onnx": ..., "onnxruntime": ..., "executorch": ..., "coremltools": ...},
  "notice":  "For research use only. Not a medical device; ..."
}

Core ML artifacts differ in their I/O (an image input with scale 1/255 and class-label +
probability outputs, as iOS expects); their entry says so in "input"/"output"/"output_kind".
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
NOTICE = ("For research use only. Not a medical device and not validated for diagnosis: every result must be "
          "reviewed by a qualified hematologist.")


class ManifestError(ValueError):
    pass


def sha256_of(path: Path | str) -> str:
    """sha256 of a file, or of a directory's files (Core ML .mlpackage is a folder) in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_manifest(manifest: dict, export_dir: Path) -> Path:
    """Atomic write: a reader never sees half a manifest."""
    path = Path(export_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


def read_manifest(export_dir: Path | str) -> dict:
    path = Path(export_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"no manifest at {path}: run `make export RUN=<name>` first")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {m.get('schema_version')!r} is not supported "
                            f"(this code reads version {SCHEMA_VERSION})")
    for key in ("classes", "input", "preprocessing", "output", "artifacts"):
        if key not in m:
            raise ManifestError(f"{path}: manifest has no '{key}'")
    return m


def artifact_path(export_dir: Path | str, entry: dict, check: bool = True) -> Path:
    """Path of an artifact; with check, refuses a missing file or one whose sha256 differs from the manifest."""
    p = Path(export_dir) / entry["file"]
    if not p.exists():
        raise ManifestError(f"artifact missing: {p}")
    if check:
        actual = sha256_of(p)
        if actual != entry["sha256"]:
            raise ManifestError(f"{p}: sha256 {actual[:16]}... does not match the manifest's {entry['sha256'][:16]}... "
                                f"(file changed or corrupted since export; re-run export)")
    return p
