"""Datasets on disk: reading images, class maps, stratified splits and the in-memory image cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cellcore.files import atomic_write_text  # noqa: F401  (train.* writes through it)
from cellcore.imaging import IMAGE_EXTS, BadImageError, decode  # noqa: F401  (BadImageError: train.* catches it)
from train.preprocess import Preprocessing

log = logging.getLogger(__name__)

CLASSMAP_DIR = Path(__file__).parent / "classmaps"


class DatasetError(ValueError):
    """A dataset folder, zip or class map that cannot be used; the message names the path."""


# ----------------------------------------------------------------------------- images

def load_rgb(path: Path | str) -> Image.Image:
    """Decode any supported image into an 8-bit RGB PIL image, or raise BadImageError.

    The app's decoder (cellcore.imaging.decode), so a photo becomes the same pixels in training, verify and
    on the phone: 16-bit and planar TIFFs, alpha, palettes and huge photos alike.
    """
    return decode(path).rgb


# ----------------------------------------------------------------------------- locating data

def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellvit-mobile"


def resolve_dataset_root(path: Path | str) -> Path:
    """A folder of class folders, a folder wrapping one, or a .zip of either -> the class-folder root."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"{path}: not a folder or a .zip archive")
        st = path.stat()
        dest = _cache_dir() / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        if not (dest / ".complete").exists():
            _extract_atomic(path, dest)
        path = dest
    # Descend through wrapper folders (PBC_dataset_normal_DIB/, AML-Cytomorphology_LMU/, __MACOSX aside).
    while True:
        subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))]
        has_images = any(f.suffix.lower() in IMAGE_EXTS for f in path.iterdir() if f.is_file())
        if len(subdirs) == 1 and not has_images and not _images_in(subdirs[0], shallow=True):
            path = subdirs[0]
            continue
        return path


def _extract_atomic(archive: Path, dest: Path) -> None:
    """Extract into a private temp folder, then rename it into place.

    Processes extracting the same archive at once (DDP ranks, parallel tuning runs) never read or write a
    half-extracted folder: each extracts alone and the first rename wins; the others drop their copy.
    """
    import shutil

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracting %s -> %s", archive, dest)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    (tmp / ".complete").write_text("ok")
    if dest.exists() and not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)  # left half-done by a run killed before extraction was atomic
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / ".complete").exists():
            raise


def _images_in(folder: Path, shallow: bool = False) -> list[Path]:
    it = folder.iterdir() if shallow else folder.rglob("*")
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


# ----------------------------------------------------------------------------- class maps

@dataclass
class ClassMap:
    """Rename, merge, select and cap classes. keep: folder -> label; rest: label for the others (or None to drop)."""

    name: str = "identity"
    keep: dict[str, str] = field(default_factory=dict)
    rest: str | None = None
    max_per_class: int | None = None

    @classmethod
    def load(cls, spec: str | Path | dict | None) -> "ClassMap | None":
        """None, a dict, a path to YAML/JSON, or the name of a shipped preset (e.g. 'aml_lmu_paper')."""
        if spec is None or spec == "":
            return None
        if isinstance(spec, dict):
            data = spec
        else:
            p = Path(spec)
            if not p.exists():
                preset = CLASSMAP_DIR / f"{spec}.yaml"
                if not preset.exists():
                    valid = sorted(f.stem for f in CLASSMAP_DIR.glob("*.yaml"))
                    raise DatasetError(f"class map not found: {spec} (not a file; shipped presets: {', '.join(valid)})")
                p = preset
            try:
                data = yaml.safe_load(p.read_text())
            except yaml.YAMLError as exc:
                raise DatasetError(f"{p}: invalid YAML/JSON class map: {exc}") from exc
            if not isinstance(data, dict) or not isinstance(data.get("keep"), dict) or not data["keep"]:
                raise DatasetError(f"{p}: a class map needs a non-empty 'keep:' mapping of folder -> label")
        unknown = set(data) - {"name", "keep", "rest", "max_per_class"}
        if unknown:
            raise DatasetError(f"class map has unknown keys {sorted(unknown)}; valid: name, keep, rest, max_per_class")
        return cls(name=str(data.get("name", "custom")), keep={str(k): str(v) for k, v in data["keep"].items()},
                   rest=data.get("rest"), max_per_class=data.get("max_per_class"))

    def to_dict(self) -> dict:
        return {"name": self.name, "keep": dict(self.keep), "rest": self.rest, "max_per_class": self.max_per_class}

    def label_for(self, folder: str) -> str | None:
        return self.keep.get(folder, self.rest)


# ----------------------------------------------------------------------------- scanning

@dataclass
class Samples:
    """Every usable file of a dataset: paths relative to root, integer labels, class names in label order."""

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def counts(self) -> dict[str, int]:
        c = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c)}

    def fingerprint(self) -> str:
        """sha256 over (relative path, size) of every file: identifies the data a model saw."""
        h = hashlib.sha256()
        for rel, lab in zip(self.paths, self.labels):
            h.update(f"{rel}\t{self.classes[lab]}\t{(self.root / rel).stat().st_size}\n".encode())
        return h.hexdigest()


def scan_dataset(path: Path | str, class_map: ClassMap | None = None, seed: int = 0) -> Samples:
    """Find class folders and their images; apply the class map. Raises DatasetError with the path."""
    root = resolve_dataset_root(path)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    if not folders:
        raise DatasetError(f"{root}: no class folders found (expected <root>/<class>/<image files>)")
    by_folder = {d.name: _images_in(d) for d in folders}
    if class_map is not None:
        missing = sorted(set(class_map.keep) - set(by_folder))
        if missing:
            raise DatasetError(f"{root}: class map '{class_map.name}' names folders that do not exist: "
                               f"{', '.join(missing)}; folders present: {', '.join(sorted(by_folder))}")
    grouped: dict[str, list[str]] = {}
    for name, files in by_folder.items():
        label = class_map.label_for(name) if class_map else name
        if label is None:
            log.info("class map drops folder %s (%d images)", name, len(files))
            continue
        grouped.setdefault(label, []).extend(str(f.relative_to(root)) for f in files)
    empty = sorted(k for k, v in grouped.items() if not v)
    if empty:
        raise DatasetError(f"{root}: class(es) with no images ({', '.join(IMAGE_EXTS)}): {', '.join(empty)}")
    if len(grouped) < 2:
        raise DatasetError(f"{root}: need at least 2 classes to train a classifier, found {sorted(grouped)}")
    classes = sorted(grouped)
    paths, labels = [], []
    for idx, name in enumerate(classes):
        files = sorted(grouped[name])
        if class_map and class_map.max_per_class and len(files) > class_map.max_per_class:
            random.Random(f"{seed}-{name}").shuffle(files)
            files = sorted(files[: class_map.max_per_class])
        paths += files
        labels += [idx] * len(files)
    return Samples(root=root, paths=paths, labels=labels, classes=classes)


def scan_onto_classes(folder: Path | str, classes: list[str], class_map: "ClassMap | dict | None" = None) -> Samples:
    """A labelled folder whose class names are (a subset of) a model's, with labels in the model's order.

    A folder class the model does not know is refused, naming it; a model class the folder lacks is
    logged (its recall cannot be measured there).
    """
    samples = scan_dataset(folder, ClassMap.load(class_map) if not isinstance(class_map, ClassMap) else class_map)
    unknown = sorted(set(samples.classes) - set(classes))
    if unknown:
        raise DatasetError(f"{folder}: classes {unknown} are not among the model's classes {classes}")
    missing = sorted(set(classes) - set(samples.classes))
    if missing:
        log.warning("%s has no images of %s: their recall is not measured", folder, ", ".join(missing))
    return Samples(samples.root, samples.paths, [classes.index(samples.classes[i]) for i in samples.labels],
                   list(classes))


# ----------------------------------------------------------------------------- split

def stratified_split(labels: list[int], val_fraction: float, seed: int,
                     test_fraction: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """Deterministic per-class split -> (train, val, test) indices; same inputs -> same split on any machine.

    Validation picks the model and tunes the uncertainty threshold; test is never looked at until the end,
    so its numbers are the honest ones. With test_fraction 0 the split is the paper's train/val only, and
    the val part is the same as with a test part (test is carved out of what would have been train).
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0 or (name == "val_fraction" and f == 0.0):
            raise ValueError(f"{name} must be in {'(0' if name == 'val_fraction' else '[0'}, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must leave images to train on, got "
                         f"{val_fraction} + {test_fraction}")
    train_idx, val_idx, test_idx = [], [], []
    labels_arr = np.asarray(labels)
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c).tolist()
        random.Random(seed * 1000003 + int(c)).shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        n_test = max(1, round(len(idx) * test_fraction)) if test_fraction > 0 and len(idx) > 2 else 0
        val_idx += idx[:n_val]
        test_idx += idx[n_val:n_val + n_test]
        train_idx += idx[n_val + n_test:]
    return sorted(train_idx), sorted(val_idx), sorted(test_idx)


def save_split(path: Path, samples: Samples, train_idx: list[int], val_idx: list[int], seed: int,
               val_fraction: float, test_idx: list[int] | None = None, test_fraction: float = 0.0) -> None:
    rows = lambda idx: [[samples.paths[i], samples.classes[samples.labels[i]]] for i in idx]  # noqa: E731
    data = {
        "root": str(samples.root), "classes": samples.classes, "seed": seed, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "fingerprint": samples.fingerprint(),
        "train": rows(train_idx), "val": rows(val_idx), "test": rows(test_idx or []),
    }
    atomic_write_text(path, json.dumps(data, indent=1))


SPLIT_PARTS = ("train", "val", "test")


def _read_split(path: Path | str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"split file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def held_out_part(path: Path) -> tuple[str, str]:
    """-> (part, description) of the split a run's final numbers come from: "test" when split.json has one.

    Runs made before the test split existed (or with --test-fraction 0, the paper's 90/10) only have the
    validation part, which chose best.pt: their numbers are optimistic, and the description says so.
    """
    data = _read_split(path)
    if data.get("test"):
        return "test", f"{path} test split ({len(data['test'])} images never used in training or selection)"
    log.warning("%s has no test part (a run from before the train/val/test split, or --test-fraction 0): "
                "numbers are on the validation split that chose the model and are optimistic", path)
    return "val", f"{path} validation split (no test part in this run: selection-biased)"


def load_split_samples(path: Path, part: str, root: Path | str | None = None) -> Samples:
    """One part ("train", "val" or "test") of a saved split.json, as Samples (root overridable if data moved)."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"unknown split part {part!r}; valid: {', '.join(SPLIT_PARTS)}")
    data = _read_split(path)
    if part not in data:
        raise DatasetError(f"{path} has no {part!r} part (a run from before the train/val/test split); "
                           f"use the 'val' part or retrain")
    classes = data["classes"]
    rows = data[part]
    base = Path(root) if root else Path(data["root"])
    if not base.exists():
        raise DatasetError(f"{path}: dataset root {base} no longer exists; pass the data folder explicitly")
    return Samples(root=base, paths=[r[0] for r in rows], labels=[classes.index(r[1]) for r in rows], classes=classes)


# ----------------------------------------------------------------------------- cache

def _decode_one(args: tuple[str, dict, int]) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    path, prep_d, scale = args
    try:
        rgb = load_rgb(path)
    except BadImageError as exc:
        return None, None, exc.reason
    prep = Preprocessing.from_dict(prep_d)
    img = np.asarray(prep.apply(rgb), dtype=np.uint8)
    src = None
    if scale > 1:  # the same crop at scale x the input size, for augmentation that zooms in
        big = dataclasses.replace(prep, input_size=prep.input_size * scale)
        src = np.asarray(big.apply(rgb), dtype=np.uint8)
    return img, src, None


@dataclass
class ImageCache:
    """Decoded, preprocessed images held in RAM: [N, S, S, 3] uint8, plus labels and what was skipped.

    Decoding a 360 px JPEG costs more than a training step of a small model on 2 cores, so every
    image is decoded and resized exactly once (the deploy-time transform), and augmentation runs
    on batches of tensors. `sources` ([N, kS, kS, 3] uint8, same crop) is there only when an
    augmentation zooms in (train.augment.source_scale k > 1): zooming into the 1x image would
    upsample it.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]]
    sources: np.ndarray | None = None

    @classmethod
    def build(cls, samples: Samples, prep: Preprocessing, workers: int = 2, source_scale: int = 1) -> "ImageCache":
        jobs = [(str(samples.root / p), prep.to_dict(), source_scale) for p in samples.paths]
        t0 = time.time()
        results = []
        if workers > 1 and len(jobs) > 64:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                for i, r in enumerate(ex.map(_decode_one, jobs, chunksize=64)):
                    results.append(r)
                    _decode_progress(i + 1, len(jobs), t0)
        else:
            for i, j in enumerate(jobs):
                results.append(_decode_one(j))
                _decode_progress(i + 1, len(jobs), t0)
        keep = [i for i, r in enumerate(results) if r[0] is not None]
        skipped = [(jobs[i][0], results[i][2]) for i in range(len(jobs)) if results[i][0] is None]
        for p, why in skipped:
            log.warning("skipped unreadable image %s: %s", p, why)
        if skipped:
            log.warning("%d of %d images skipped as unreadable (listed above)", len(skipped), len(jobs))
        if not keep:
            raise DatasetError(f"{samples.root}: none of the {len(jobs)} images could be decoded")
        images = _stack([results[i][0] for i in keep])
        sources = _stack([results[i][1] for i in keep]) if source_scale > 1 else None
        return cls(images=images, labels=np.asarray([samples.labels[i] for i in keep], dtype=np.int64),
                   paths=[samples.paths[i] for i in keep], classes=list(samples.classes), skipped=skipped,
                   sources=sources)

    def __len__(self) -> int:
        return len(self.labels)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack without holding the list and the stack at once for long: fill a preallocated array."""
    out = np.empty((len(arrays), *arrays[0].shape), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _decode_progress(done: int, total: int, t0: float) -> None:
    """Decoding a large dataset takes minutes: say how far it is, every 10%."""
    step = max(1, total // 10)
    if total >= 500 and (done % step == 0 or done == total):
        log.info("decoding images: %d/%d (%.0f s)", done, total, time.time() - t0)
