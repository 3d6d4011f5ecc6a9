"""Reads manifest.json (schema 1, see export/manifest.py) and checks model files by sha256, torch-free."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cellcore.preprocess import INTERPOLATIONS, RESIZE_POLICIES, Preprocessing
from mobile_app.errors import ManifestError, ModelIntegrityError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "executorch", "coreml")
PRECISION_ORDER = ("fp32", "fp16", "int8")  # preferred first when several files of a format exist
SUPPORTED_RESIZE = RESIZE_POLICIES          # cellcore.preprocess: the app runs the training code itself
SUPPORTED_INTERPOLATION = tuple(INTERPOLATIONS)
DEFAULT_NOTICE = ("For research use only. Not a medical device and not validated for diagnosis: every result "
                  "must be reviewed by a qualified hematologist.")


def sha256_of(path: Path | str) -> str:
    """sha256 of a file, or of a directory's files (a Core ML .mlpackage) in sorted order.

    Same definition as export/manifest.py sha256_of: for a directory, each file's path relative
    to it, a NUL byte, then its bytes.
    """
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


@dataclass(frozen=True)
class Artifact:
    """One model file of the export and how to call it."""

    file: str
    format: str
    precision: str
    runtime: str
    input_name: str
    output_name: str
    output_kind: str  # "logits" or "probabilities"
    sha256: str
    size_bytes: int | None
    path: Path

    @property
    def present(self) -> bool:
        return self.path.exists()


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json the app uses; `raw` keeps the whole document for the About screen."""

    path: Path
    classes: list[str]
    input_size: int
    threshold: float | None  # PyTorch's; each model file's own is in raw["uncertainty"]["per_artifact"]
    artifacts: list[Artifact]
    raw: dict = field(repr=False)
    preprocessing: Preprocessing | None = None  # photo -> model input, exactly as in training

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def notice(self) -> str:
        return str(self.raw.get("notice") or DEFAULT_NOTICE)

    def choose(self, supported: tuple[str, ...], fmt: str | None = None) -> Artifact:
        """The artifact to load: of `fmt` if given, else of the first supported format whose file is present."""
        return self.candidates(supported, fmt)[0]

    def candidates(self, supported: tuple[str, ...], fmt: str | None = None) -> list[Artifact]:
        """Present artifacts this device can run, best first (format order of `supported`, then fp32 > fp16 > int8)."""
        if fmt is not None and fmt not in FORMATS:
            raise ManifestError(f"unknown model format {fmt!r}; valid: {', '.join(FORMATS)}")
        wanted = (fmt,) if fmt else supported
        if fmt and fmt not in supported:
            raise ManifestError(f"this device cannot run {fmt} models (it runs: {', '.join(supported)})")
        listed = [a for a in self.artifacts if a.format in wanted]
        if not listed:
            raise ManifestError(f"{self.path}: lists no {' or '.join(wanted)} model "
                                f"(it lists: {', '.join(a.file for a in self.artifacts) or 'nothing'})")
        present = [a for a in listed if a.present]
        if not present:
            raise ModelIntegrityError(f"model file missing: {listed[0].path} (listed in the manifest but not "
                                      f"in {self.folder}); copy the export folder again")

        def rank(a: Artifact) -> tuple[int, int]:
            prec = PRECISION_ORDER.index(a.precision) if a.precision in PRECISION_ORDER else len(PRECISION_ORDER)
            return (wanted.index(a.format), prec)

        return sorted(present, key=rank)


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(f"{path}: {what}")


def load_manifest(model_dir: Path | str) -> Manifest:
    """Read and validate manifest.json in `model_dir` (or the file itself); ManifestError says what is wrong."""
    path = Path(model_dir)
    if path.is_dir() or not path.suffix:
        path = path / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"no model found: {path} does not exist (export a model with `python -m export`, "
                            f"or pass --model-dir)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from exc
    _require(isinstance(m, dict), path, "is not a JSON object")
    version = m.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: manifest schema_version {version!r} is not supported: this app reads version "
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
    _require(prep.get("resize", SUPPORTED_RESIZE[0]) in SUPPORTED_RESIZE, path,
             f"preprocessing.resize {prep.get('resize')!r} is not supported (this app does "
             f"{', '.join(SUPPORTED_RESIZE)}): update the app")
    _require(prep.get("interpolation", SUPPORTED_INTERPOLATION[0]) in SUPPORTED_INTERPOLATION, path,
             f"preprocessing.interpolation {prep.get('interpolation')!r} is not supported "
             f"(this app does {', '.join(SUPPORTED_INTERPOLATION)})")
    try:
        preprocessing = Preprocessing.from_dict(prep)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: invalid preprocessing ({exc})") from exc
    _require(prep.get("normalization_in_model", True) is True, path,
             "preprocessing.normalization_in_model is false: this app feeds 0..1 pixels and never normalises")
    unc = m["uncertainty"]
    threshold = unc.get("threshold") if isinstance(unc, dict) else None
    _require(threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                   and 0.0 <= threshold <= 1.0),
             path, f"uncertainty.threshold must be a number in 0..1 or null, got {threshold!r}")
    default_in = (m.get("input") or {}).get("name", "image")
    default_out = (m.get("output") or {}).get("name", "logits")
    artifacts = []
    _require(isinstance(m["artifacts"], list), path, "'artifacts' must be a list")
    for i, e in enumerate(m["artifacts"]):
        _require(isinstance(e, dict) and all(k in e for k in ("file", "format", "sha256")), path,
                 f"artifacts[{i}] needs at least 'file', 'format' and 'sha256'")
        _require(Path(e["file"]).name == e["file"], path, f"artifacts[{i}].file must be a plain file name")
        kind = e.get("output_kind", "probabilities" if e["format"] == "coreml" else "logits")
        _require(kind in ("logits", "probabilities"), path, f"artifacts[{i}].output_kind {kind!r} is unknown")
        artifacts.append(Artifact(
            file=e["file"], format=str(e["format"]), precision=str(e.get("precision", "fp32")),
            runtime=str(e.get("runtime", "")), input_name=_io_name(e.get("input"), default_in),
            output_name=_io_name(e.get("output"), default_out), output_kind=kind, sha256=str(e["sha256"]).lower(),
            size_bytes=e.get("size_bytes"), path=path.parent / e["file"]))
    return Manifest(path=path, classes=list(classes), input_size=size, threshold=None if threshold is None else float(cast(float, threshold)),
                    artifacts=artifacts, raw=m, preprocessing=preprocessing)


def _io_name(value: object, default: str) -> str:
    """An artifact's "input"/"output" is a name, or (Core ML) an object with a "name"."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return default


def verify_artifact(artifact: Artifact) -> Path:
    """The artifact's path, after checking it exists and its sha256 matches the manifest; refuses otherwise."""
    if not artifact.present:
        raise ModelIntegrityError(f"model file missing: {artifact.path}")
    actual = sha256_of(artifact.path)
    if actual != artifact.sha256:
        raise ModelIntegrityError(
            f"model file {artifact.file} does not match the manifest (sha256 {actual[:12]}… instead of "
            f"{artifact.sha256[:12]}…): it was changed or damaged after export. Refusing to load it; "
            f"copy the export folder again.")
    log.info("verified %s (sha256 %s…)", artifact.file, actual[:12])
    return artifact.path
