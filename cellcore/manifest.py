"""manifest.json: the contract between export, verification, benchmarks and the app (schema, validation, I/O).

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
  "output":  {"name": "logits", "shape": [1, C] or [1, C + 1], "meaning": "..."},  # + the feature distance column
  "uncertainty": {"threshold": 0.8, "rule": "...", "target_accuracy": 0.99, "target_met": true,
                  "accuracy_at_or_above": 0.995, "coverage": 0.93,
                  "feature_distance": {"file": "feature_distance.npz", "column": C, "max_distance": 0.55, ...},
                  "per_artifact": {"<artifact file>": {"temperature": ..., "threshold": ..., "max_distance": ...}}},
  "metrics": {"training": {"val_acc": ..., "val_macro_f1": ..., ...},
              "verify": {"<artifact file>": {"accuracy": ..., "macro_f1": ..., "agreement": ...}}},
  "dataset": {"name": "pbc_dev", "fingerprint": "...", "train_counts": {...}, "class_map": null},
  "artifacts": [{"file": "mobilevit_xxs_onnx_fp32.onnx", "format": "onnx", "precision": "fp32",
                 "runtime": "onnxruntime", "batch": "dynamic", "input": "image", "output": "logits",
                 "output_kind": "logits", "feature_distance_column": C, "size_bytes": 123, "sha256": "..."}, ...],
  "tools":   {"torch": "2.14.1", "onnx": ..., "onnxruntime": ..., "executorch": ..., "coremltools": ...},
  "notice":  "For research use only. Not a medical device; ..."
}

Core ML artifacts differ in their I/O (an image input with scale 1/255 and class-label +
probability outputs, as iOS expects); their entry says so in "input"/"output"/"output_kind".
"""
from __future__ import annotations

import json
from pathlib import Path

from cellcore.files import atomic_write_text, sha256_of, size_of  # noqa: F401  (re-exported: export uses them)
from cellcore.preprocess import INTERPOLATIONS, RESIZE_POLICIES, Preprocessing

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "executorch", "coreml")
OUTPUT_KINDS = ("logits", "probabilities")
NOTICE = ("For research use only. Not a medical device and not validated for diagnosis: every result must be "
          "reviewed by a qualified hematologist.")


class ManifestError(ValueError):
    """manifest.json missing, unreadable, of another schema version, or inconsistent; the message names the file."""


class ArtifactMismatch(ManifestError):
    """A model file is missing or its sha256 differs from the manifest's: it must never be loaded."""


def manifest_file(path: Path | str) -> Path:
    """An export folder or the manifest file itself -> the manifest file."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or not path.suffix else path


def write_manifest(manifest: dict, export_dir: Path | str) -> Path:
    """Atomic write: a reader never sees half a manifest. Floats must be finite (NaN is not JSON)."""
    return atomic_write_text(Path(export_dir) / MANIFEST_NAME, json.dumps(manifest, indent=2, allow_nan=False))


def read_manifest(path: Path | str) -> dict:
    """Read and validate manifest.json (an export folder or the file); ManifestError says what is wrong.

    The one validator: export.verify, the benchmarks and the app all read through here, so a manifest one of
    them accepts, all of them accept.
    """
    path = manifest_file(path)
    if not path.exists():
        raise ManifestError(f"no manifest at {path}: export a model first (make export RUN=<name>), "
                            f"or pass the folder that holds manifest.json")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from exc
    validate(m, path)
    return m


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def validate(m: object, path: Path) -> None:
    """Schema 1's rules (see the module docstring); raises ManifestError naming the first problem."""
    _require(isinstance(m, dict), path, "is not a JSON object")
    assert isinstance(m, dict)  # for the type checker; _require has refused anything else
    version = m.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: manifest schema_version {version!r} is not supported: this code reads version "
                            f"{SCHEMA_VERSION}. Update the app, or export the model with a matching exporter.")
    for key in ("classes", "input", "preprocessing", "output", "artifacts", "uncertainty"):
        _require(key in m, path, f"manifest has no '{key}'")
    classes = m["classes"]
    _require(isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes),
             path, "'classes' must be a list of at least two names")
    prep = m["preprocessing"]
    _require(isinstance(prep, dict), path, "'preprocessing' must be an object")
    size = prep.get("input_size")
    _require(type(size) is int and size >= 32, path, f"preprocessing.input_size must be an integer >= 32, got {size!r}")
    _require(prep.get("resize", RESIZE_POLICIES[0]) in RESIZE_POLICIES, path,
             f"preprocessing.resize {prep.get('resize')!r} is not supported (this code does "
             f"{', '.join(RESIZE_POLICIES)}): update the app")
    _require(prep.get("interpolation", "bilinear") in INTERPOLATIONS, path,
             f"preprocessing.interpolation {prep.get('interpolation')!r} is not supported "
             f"(this code does {', '.join(INTERPOLATIONS)})")
    try:
        Preprocessing.from_dict(prep)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: invalid preprocessing ({exc})") from exc
    _require(prep.get("normalization_in_model", True) is True, path,
             "preprocessing.normalization_in_model is false: the app feeds 0..1 pixels and never normalises")
    unc = m["uncertainty"]
    _require(isinstance(unc, dict), path, "'uncertainty' must be an object")
    threshold = unc.get("threshold")
    _require(threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                   and 0.0 <= threshold <= 1.0),
             path, f"uncertainty.threshold must be a number in 0..1 or null, got {threshold!r}")
    _require(isinstance(m["artifacts"], list), path, "'artifacts' must be a list")
    for i, e in enumerate(m["artifacts"]):
        _require(isinstance(e, dict) and all(k in e for k in ("file", "format", "sha256")), path,
                 f"artifacts[{i}] needs at least 'file', 'format' and 'sha256'")
        _require(Path(e["file"]).name == e["file"], path, f"artifacts[{i}].file must be a plain file name")
        _require(e["format"] in FORMATS, path, f"artifacts[{i}].format {e['format']!r} is unknown; valid: "
                                               f"{', '.join(FORMATS)}")
        _require(output_kind(e) in OUTPUT_KINDS, path, f"artifacts[{i}].output_kind {output_kind(e)!r} is unknown")


def output_kind(entry: dict) -> str:
    """What an artifact outputs: Core ML classifiers give probabilities, the others logits, unless it says."""
    return entry.get("output_kind", "probabilities" if entry.get("format") == "coreml" else "logits")


def artifact_path(export_dir: Path | str, entry: dict, check: bool = True) -> Path:
    """Path of an artifact; with check, refuses a missing file or one whose sha256 differs from the manifest."""
    p = Path(export_dir) / entry["file"]
    if not p.exists():
        raise ArtifactMismatch(f"model file missing: {p} (listed in the manifest but not in {Path(export_dir)}); "
                               f"copy the export folder again")
    if check:
        actual = sha256_of(p)
        if actual != str(entry["sha256"]).lower():
            raise ArtifactMismatch(f"model file {p} does not match the manifest (sha256 {actual[:12]}… instead of "
                                   f"{str(entry['sha256'])[:12]}…): it was changed or damaged after export. "
                                   f"Refusing to use it; export again or copy the export folder again.")
    return p
