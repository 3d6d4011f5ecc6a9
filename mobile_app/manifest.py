"""The app's view of manifest.json (schema and validation: cellcore.manifest) and its model files."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cellcore import manifest as schema
from cellcore.preprocess import Preprocessing
from mobile_app.errors import ManifestError, ModelIntegrityError

log = logging.getLogger(__name__)

FORMATS = schema.FORMATS
MANIFEST_NAME = schema.MANIFEST_NAME
PRECISION_ORDER = ("fp32", "fp16", "int8")  # preferred first when several files of a format exist


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
    distance_column: int | None = None  # the output column after the logits that holds the feature distance

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
        return str(self.raw.get("notice") or schema.NOTICE)

    def choose(self, supported: tuple[str, ...], fmt: str | None = None, precision: str | None = None) -> Artifact:
        """The artifact to load: of `fmt` if given, else of the first supported format whose file is present;
        of `precision` if given (the bundle ships one file, e.g. the int8 ONNX)."""
        found = [a for a in self.candidates(supported, fmt) if precision in (None, a.precision)]
        if not found:
            raise ManifestError(f"{self.path}: no {precision} {fmt or ' or '.join(supported)} model is present "
                                f"(present: {', '.join(a.file for a in self.artifacts if a.present) or 'none'})")
        return found[0]

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


def load_manifest(model_dir: Path | str) -> Manifest:
    """Read and validate manifest.json in `model_dir` (or the file itself); ManifestError says what is wrong."""
    path = schema.manifest_file(model_dir)
    if not path.exists():
        raise ManifestError(f"no model found: {path} does not exist (export a model with `python -m export`, "
                            f"or pass --model-dir)")
    try:
        m = schema.read_manifest(path)
    except schema.ManifestError as exc:  # the app's own error class: the UI shows it as a model problem
        raise ManifestError(str(exc)) from exc
    threshold = m["uncertainty"].get("threshold")
    default_in = (m.get("input") or {}).get("name", "image")
    default_out = (m.get("output") or {}).get("name", "logits")
    artifacts = [Artifact(
        file=e["file"], format=str(e["format"]), precision=str(e.get("precision", "fp32")),
        runtime=str(e.get("runtime", "")), input_name=_io_name(e.get("input"), default_in),
        output_name=_io_name(e.get("output"), default_out), output_kind=schema.output_kind(e),
        sha256=str(e["sha256"]).lower(), size_bytes=e.get("size_bytes"), path=path.parent / e["file"],
        distance_column=e.get("feature_distance_column"))
        for e in m["artifacts"]]
    return Manifest(path=path, classes=list(m["classes"]), input_size=m["preprocessing"]["input_size"],
                    threshold=None if threshold is None else float(threshold), artifacts=artifacts, raw=m,
                    preprocessing=Preprocessing.from_dict(m["preprocessing"]))


def _io_name(value: object, default: str) -> str:
    """An artifact's "input"/"output" is a name, or (Core ML) an object with a "name"."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return default


def verify_artifact(artifact: Artifact) -> Path:
    """The artifact's path, after checking it exists and its sha256 matches the manifest; refuses otherwise."""
    try:
        path = schema.artifact_path(artifact.path.parent, {"file": artifact.file, "sha256": artifact.sha256})
    except schema.ArtifactMismatch as exc:
        raise ModelIntegrityError(str(exc)) from exc
    log.info("verified %s (sha256 %s…)", artifact.file, artifact.sha256[:12])
    return path
