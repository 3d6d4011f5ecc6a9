"""Robustness of one run's model and every exported artifact to synthetic acquisition shifts and real other-lab folders.

python -m benchmarks.robustness --run-dir runs/NAME [--data FOLDER ...] [--images 200] [--shifts blur jpeg]
                                [--strengths mild medium strong] [--out runs/NAME/bench]

This module owns the shift definitions (SHIFTS: one small pure function per kind of shift, applied to
the decoded full-resolution photo BEFORE the preprocessing, as a different microscope, stain, camera
or compression would) and the benchmark that runs them: for every (shift, strength) the held-out
images of the run's split.json ("val", at most --images, spread over the classes) are shifted once,
checked by the picture checks once, preprocessed once, and the same [N, 3, S, S] array goes through
PyTorch (best.pt) and every artifact of export/manifest.json in its real runtime (ONNX Runtime,
ExecuTorch; Core ML needs macOS). Each --data folder (real labelled photos from another lab, its
class folders a subset of the model's classes) is measured unshifted. Per format and condition:
accuracy, macro-F1, the share flagged "uncertain" by cellcore.uncertainty's rule (picture checks on
the shifted photo, then the artifact's calibrated threshold) and the accuracy of what is not flagged.

Writes runs/NAME/bench/robustness.json (everything, with the machine and the command),
robustness.md (one table) and robustness.png (accuracy vs strength, one panel per shift).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import platform
import random
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

LEVELS = {1: "mild", 2: "medium", 3: "strong"}
LEVEL_NUMBERS = {v: k for k, v in LEVELS.items()}
DEFAULT_IMAGES = 200
DEFAULT_SEED = 0


# ----------------------------------------------------------------------------- shifts
# Every shift: (full-resolution 8-bit RGB photo, strength 1..3, numpy Generator) -> 8-bit RGB photo.
# Pure: the input is never modified; the same (image, strength, seed) always gives the same pixels.

def _pick(strength: int, values: tuple[float, float, float]) -> float:
    if strength not in LEVELS:
        raise ValueError(f"strength must be one of {sorted(LEVELS)}, got {strength!r}")
    return values[strength - 1]


def _to_u8(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")


def background_colour(img: Image.Image) -> tuple[int, int, int]:
    """The field's background: the median of the brightest 30% of the photo's 1-pixel border (the cell is
    centred; red cells at the edge are darker than the plasma between them)."""
    a = np.asarray(img, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # [2W + 2H, 3]
    lum = border.mean(axis=1)
    bright = border[lum >= np.percentile(lum, 70)]
    return tuple(int(round(v)) for v in np.median(bright, axis=0))


def shift_none(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """The clean photo (the baseline)."""
    return img.copy()


def shift_zoom_in(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Higher magnification / tighter framing: the centred 0.7 / 0.5 / 0.35 of the field, resized back."""
    f = _pick(strength, (0.7, 0.5, 0.35))
    w, h = img.size
    cw, ch = f * w, f * h
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize((w, h), Image.BILINEAR, box=box)


def shift_zoom_out(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Lower magnification: the field becomes 1.4x / 2x / 3x as wide (padded with the background colour),
    then resized back to the photo's size (the cell covers fewer pixels, as with a weaker objective)."""
    f = _pick(strength, (1.4, 2.0, 3.0))
    w, h = img.size
    W, H = round(w * f), round(h * f)
    canvas = Image.new("RGB", (W, H), background_colour(img))
    canvas.paste(img, ((W - w) // 2, (H - h) // 2))
    return canvas.resize((w, h), Image.BILINEAR)


def shift_stain(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Another stain batch / protocol: optical densities scaled per channel (+-10/20/35%, random signs:
    stain strength and colour) and mixed across channels (a dye of another hue), then a hue rotation
    of 6/12/20 degrees and a saturation change of +-15/30/45% (random directions).

    Per-channel OD scaling alone would be undone exactly by an `od_instance` model's normalisation;
    the cross-channel mixing and the hue/saturation change are not."""
    scale = _pick(strength, (0.10, 0.20, 0.35))
    mix = _pick(strength, (0.05, 0.10, 0.18))
    hue_deg = _pick(strength, (6.0, 12.0, 20.0))
    sat = _pick(strength, (0.15, 0.30, 0.45))
    a = np.asarray(img, dtype=np.float32)                          # [H, W, 3] 0..255
    od = -np.log(np.maximum(a, 1.0) / 255.0)                       # [H, W, 3] optical density, 0 (white) ..
    factors = 1.0 + scale * rng.choice([-1.0, 1.0], 3) * rng.uniform(0.6, 1.0, 3)
    m = np.diag(factors) + mix * rng.uniform(-1.0, 1.0, (3, 3)) * (1 - np.eye(3))
    od = np.maximum(od @ m.T, 0.0)
    rgb = _to_u8(255.0 * np.exp(-od))
    hsv = np.asarray(rgb.convert("HSV"), dtype=np.float32)         # [H, W, 3] H, S, V in 0..255
    hsv[..., 0] = (hsv[..., 0] + rng.choice([-1.0, 1.0]) * hue_deg / 360.0 * 256.0) % 256.0
    hsv[..., 1] = hsv[..., 1] * (1.0 + rng.choice([-1.0, 1.0]) * sat)
    hsv = np.clip(np.round(hsv), 0, 255).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def shift_blur(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Defocus: a Gaussian blur of radius 0.4 / 0.8 / 1.6 % of the photo's shorter side (1.4 / 2.9 / 5.8 px
    on a 360 px PBC photo)."""
    r = _pick(strength, (0.004, 0.008, 0.016)) * min(img.size)
    return img.filter(ImageFilter.GaussianBlur(max(r, 0.5)))


def shift_resolution(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """A lower-resolution camera: downscaled to 1/2, 1/3, 1/4 (bilinear, antialiased) and back up bilinear."""
    f = _pick(strength, (2, 3, 4))
    w, h = img.size
    small = img.resize((max(1, round(w / f)), max(1, round(h / f))), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def shift_jpeg(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Compression by a messenger / LIMS: JPEG at quality 40 / 20 / 10, encoded and decoded in memory."""
    q = int(_pick(strength, (40, 20, 10)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def shift_illumination(img: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Another lamp / exposure: brightness gain +-10/20/35% and gamma x/÷ 1.15/1.3/1.6 (random directions),
    a linear lamp gradient of 10/20/35% across the field (random direction) and a vignette darkening
    the corners by 8/15/30%."""
    gain = 1.0 + rng.choice([-1.0, 1.0]) * _pick(strength, (0.10, 0.20, 0.35))
    gamma = _pick(strength, (1.15, 1.3, 1.6)) ** rng.choice([-1.0, 1.0])
    grad = _pick(strength, (0.10, 0.20, 0.35))
    vig = _pick(strength, (0.08, 0.15, 0.30))
    a = np.asarray(img, dtype=np.float32) / 255.0                  # [H, W, 3] 0..1
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h - 1, 1) - 0.5, xx / max(w - 1, 1) - 0.5   # [H, W] -0.5..0.5
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = 1.0 + grad * (xx * math.cos(theta) + yy * math.sin(theta))  # [H, W] 1 +- grad/2 (more in corners)
    vignette = 1.0 - vig * (xx ** 2 + yy ** 2) / 0.5               # [H, W] 1 at the centre, 1 - vig in corners
    out = (a ** gamma) * gain * (ramp * vignette)[..., None]
    return _to_u8(out * 255.0)


ShiftFn = Callable[[Image.Image, int, np.random.Generator], Image.Image]
SHIFTS: dict[str, ShiftFn] = {
    "none": shift_none,
    "zoom_in": shift_zoom_in,
    "zoom_out": shift_zoom_out,
    "stain": shift_stain,
    "blur": shift_blur,
    "resolution": shift_resolution,
    "jpeg": shift_jpeg,
    "illumination": shift_illumination,
}


def shift_rng(seed: int, key: str, shift: str, strength: int) -> np.random.Generator:
    """The generator for one image under one condition: a stable hash (not Python's salted hash())."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(shift.encode()), strength])


def conditions(shifts: list[str], strengths: list[int]) -> list[tuple[str, int]]:
    """[("none", 0), (shift, strength), ...] in a fixed order."""
    return [("none", 0)] + [(s, k) for s in shifts if s != "none" for k in strengths]


def condition_name(shift: str, strength: int) -> str:
    return "clean" if shift == "none" else f"{shift}/{LEVELS[strength]}"


# ----------------------------------------------------------------------------- data

@dataclass
class Source:
    """Decoded photos of one evaluation set (decoded once, shifted many times)."""

    name: str
    description: str
    images: list[Image.Image]   # full-resolution 8-bit RGB
    keys: list[str]             # stable per-image keys (relative paths): seed the shifts
    labels: np.ndarray          # [N] int64, indices into the model's classes


def spread_over_classes(labels: list[int], n: int, seed: int) -> list[int]:
    """At most n indices, round-robin over the classes (each class's order shuffled by seed), sorted."""
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    queues = []
    for lab in sorted(by_class):
        idx = by_class[lab]
        random.Random(f"{seed}-{lab}").shuffle(idx)
        queues.append(idx)
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def load_val(run_dir: Path, classes: list[str], n: int, seed: int) -> Source:
    from train.data import DatasetError, held_out_part, load_rgb, load_split_samples

    part, _ = held_out_part(run_dir / "split.json")  # test; val for runs made before the test split
    samples = load_split_samples(run_dir / "split.json", part)
    if samples.classes != classes:
        raise DatasetError(f"{run_dir}/split.json classes {samples.classes} differ from the model's {classes}")
    idx = spread_over_classes(samples.labels, n, seed)
    log.info("decoding %d of %d held-out images from %s", len(idx), len(samples.paths), samples.root)
    return Source(name="val", description=f"{run_dir}/split.json {part} ({len(idx)} of {len(samples.paths)})",
                  images=[load_rgb(samples.root / samples.paths[i]) for i in idx],
                  keys=[samples.paths[i] for i in idx],
                  labels=np.asarray([samples.labels[i] for i in idx], dtype=np.int64))


def load_folder(folder: Path | str, classes: list[str]) -> Source:
    """Every image of a labelled class-folder dataset, its folder names mapped onto the model's classes."""
    from train.data import load_rgb, scan_onto_classes

    samples = scan_onto_classes(folder, classes)
    labels = np.asarray(samples.labels, dtype=np.int64)
    log.info("decoding %d images from %s", len(samples.paths), samples.root)
    return Source(name=Path(folder).name, description=f"{folder} ({len(labels)} images, unshifted)",
                  images=[load_rgb(samples.root / p) for p in samples.paths], keys=list(samples.paths),
                  labels=labels)


def prepare(images: list[Image.Image], prep) -> np.ndarray:
    """Photos -> [N, 3, S, S] float32 in 0..1 through the run's own preprocessing (what the app does)."""
    s = prep.input_size
    x = np.empty((len(images), 3, s, s), dtype=np.float32)
    for i, img in enumerate(images):
        x[i] = np.asarray(prep.apply(img), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return x


# ----------------------------------------------------------------------------- formats

@dataclass
class Format:
    label: str        # "pytorch fp32", "onnx int8", ...
    file: str         # "best.pt" or the artifact's file name
    fmt: str          # pytorch / onnx / executorch / coreml
    precision: str
    kind: str         # "logits" or "probabilities"
    rule: object      # cellcore.uncertainty.UncertaintyRule
    run: Callable[[np.ndarray], np.ndarray] | None  # [N, 3, S, S] float32 0..1 -> [N, C]; None: skipped
    note: str = ""


def torch_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()

    return run


def load_formats(run_dir: Path, manifest: dict, model, classes: list[str], threads: int) -> list[Format]:
    from cellcore.uncertainty import rule_for
    from cellcore.manifest import artifact_path
    from export.runtimes import CoreMLRunner, ExecutorchRunner, OnnxRunner, RuntimeUnavailable

    export_dir = run_dir / "export"
    # PyTorch's rule: verify records it under "best.pt"; rule_for falls back to the manifest-wide rule.
    out = [Format("pytorch fp32", "best.pt", "pytorch", "fp32", "logits", rule_for(manifest, "best.pt"),
                  torch_runner(model))]
    for entry in manifest["artifacts"]:
        fmt, prec, kind = entry["format"], entry.get("precision", "?"), entry.get("output_kind", "logits")
        label = f"{fmt} {prec}"
        rule = rule_for(manifest, entry["file"])
        if fmt == "coreml":
            try:
                runner = CoreMLRunner(artifact_path(export_dir, entry), classes)
            except RuntimeUnavailable:
                out.append(Format(label, entry["file"], fmt, prec, kind, rule, None, "needs macOS"))
                log.info("%s: skipped (Core ML needs macOS)", entry["file"])
                continue
        elif fmt == "onnx":
            runner = OnnxRunner(artifact_path(export_dir, entry), threads=threads)
        elif fmt == "executorch":
            runner = ExecutorchRunner(artifact_path(export_dir, entry))
        else:
            out.append(Format(label, entry["file"], fmt, prec, kind, rule, None, f"unknown format {fmt!r}"))
            log.warning("%s: unknown format %r, skipped", entry["file"], fmt)
            continue
        out.append(Format(label, entry["file"], fmt, prec, kind, rule, runner))
    labels = [f.label for f in out]
    for f in out:  # two artifacts of one format and precision: tell them apart by file name
        if labels.count(f.label) > 1:
            f.label = f"{f.label} ({Path(f.file).stem})"
    return out


# ----------------------------------------------------------------------------- metrics

def score(out: np.ndarray, y: np.ndarray, problems: list[list[str]], f: Format, classes: list[str]) -> dict:
    """out [N, C] logits or probabilities, y [N] -> accuracy, macro-F1, share flagged, accuracy of the rest."""
    from train.metrics import report

    probs = f.rule.probabilities(out, f.kind)                     # [N, C] calibrated probabilities
    pred = probs.argmax(1)
    rep = report(y, pred, classes)
    flagged = f.rule.flagged(probs, problems, f.rule.distances(out))  # + the feature distance column, if any
    kept = ~flagged
    return {"n": int(len(y)), "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
            "balanced_accuracy": rep["balanced_accuracy"], "flagged": float(flagged.mean()) if len(y) else 0.0,
            "n_kept": int(kept.sum()),
            "accuracy_unflagged": float((pred == y)[kept].mean()) if kept.any() else None,
            "confusion_matrix": rep["confusion_matrix"]}


def evaluate(source: Source, shift: str, strength: int, prep, formats: list[Format], classes: list[str],
             checks, seed: int) -> tuple[list[dict], dict]:
    """One condition: shift every photo once, check once, preprocess once, run every format on that array."""
    t0 = time.perf_counter()
    fn = SHIFTS[shift]
    shifted = [img if shift == "none" else fn(img, strength, shift_rng(seed, key, shift, strength))
               for img, key in zip(source.images, source.keys)]
    # The picture checks come from manifest["uncertainty"]["picture_checks"]: the same for every format.
    problems = [checks.problems(img) for img in shifted]
    x = prepare(shifted, prep)                                     # [N, 3, S, S] float32 in 0..1
    t_prep = time.perf_counter() - t0
    base = {"source": source.name, "shift": shift, "strength": strength,
            "level": "clean" if shift == "none" else LEVELS[strength],
            "condition": condition_name(shift, strength) if source.name == "val" else source.name}
    rows = []
    for f in formats:
        if f.run is None:
            continue
        t1 = time.perf_counter()
        out = f.run(x)                                             # [N, C]
        rows.append({**base, "format": f.label, "file": f.file, "precision": f.precision,
                     **score(out, source.labels, problems, f, classes),
                     "seconds": round(time.perf_counter() - t1, 3)})
    info = {**base, "n": len(shifted), "picture_check_flagged": float(np.mean([bool(p) for p in problems])),
            "preprocess_seconds": round(t_prep, 3)}
    log.info("%-22s %s  prep %.1fs  %s", base["condition"], " ".join(
        f"{r['format']}={r['accuracy']:.3f}" for r in rows), t_prep,
        f"checks flag {info['picture_check_flagged']:.0%}")
    return rows, info


# ----------------------------------------------------------------------------- outputs

def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_markdown(doc: dict) -> str:
    formats = [f["label"] for f in doc["formats"] if not f["note"]]
    skipped = [f for f in doc["formats"] if f["note"]]
    by = {(r["condition"], r["format"]): r for r in doc["rows"]}
    conds = doc["conditions"]
    head = ["condition", "n", "checks flag"]
    for lab in formats:
        head += [f"{lab} acc", "F1", "flag", "acc kept"]
    lines = [f"# Robustness: {doc['run_dir']}", "",
             f"Model {doc['model']}, {doc['input_size']} px, preprocessing `{doc['resize']}`. Held-out images: "
             f"{doc['val_source']}; shifts applied to the decoded photo before the preprocessing, seeded per image "
             f"(seed {doc['seed']}). Real folders: unshifted. Per format: accuracy, macro-F1, share flagged "
             "uncertain (picture checks or top probability below the format's threshold), accuracy of the "
             "predictions not flagged (– when none kept). 'checks flag': share failing the picture checks alone.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conds:
        cells = [c["condition"], str(c["n"]), _f(c["picture_check_flagged"], ".0%")]
        for lab in formats:
            r = by.get((c["condition"], lab))
            cells += ([_f(r["accuracy"], ".3f"), _f(r["macro_f1"], ".3f"), _f(r["flagged"], ".0%"),
                       _f(r["accuracy_unflagged"], ".3f")] if r else ["–"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{f['label']} ({f['file']}): {f['note']}" for f in skipped) + "."]
    lines += ["", "Thresholds: " + "; ".join(
        f"{f['label']} T={f['temperature']:.3g}, threshold {_f(f['threshold'], '.3f')}" for f in doc["formats"]
        if not f["note"]) + ("" if doc["per_artifact_rules"] else
                             " (manifest has no per-artifact rules: every format uses the manifest-wide one)") + ".",
              "", f"Machine: {doc['machine']['cpu']}, {doc['machine']['usable_cores']} cores; "
              f"{doc['seconds']:.0f} s. Command: `{doc['command']}`"]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = [f["label"] for f in doc["formats"] if not f["note"]]
    shifts = [s for s in doc["settings"]["shifts"] if s != "none"]
    folders = doc["settings"]["folders"]
    val = [r for r in doc["rows"] if r["source"] == "val"]
    clean = {r["format"]: r["accuracy"] for r in val if r["shift"] == "none"}
    panels = len(shifts) + (1 if folders else 0)
    cols = min(4, max(panels, 1))
    rows_n = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.9 * rows_n), squeeze=False, sharey=True)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    for ax, shift in zip(axes.flat, shifts):
        for j, lab in enumerate(formats):  # fp32 exports equal PyTorch: distinct styles keep them visible
            pts = sorted((r["strength"], r["accuracy"]) for r in val if r["shift"] == shift and r["format"] == lab)
            xs, ys = [0] + [p[0] for p in pts], [clean.get(lab, float("nan"))] + [p[1] for p in pts]
            ax.plot(xs, ys, marker="os^vDx"[j % 6], ms=4 - 0.4 * (j % 4), ls=("-", "--", ":", "-.")[j % 4],
                    lw=1.2, label=lab)
        ax.set_title(shift)
        ax.set_xticks(range(0, 4), ["clean", "mild", "med.", "strong"], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if folders:
        ax = axes.flat[len(shifts)]
        width = 0.8 / max(len(formats), 1)
        for j, lab in enumerate(formats):
            accs = [next((r["accuracy"] for r in doc["rows"] if r["source"] == fo and r["format"] == lab), 0.0)
                    for fo in folders]
            ax.bar(np.arange(len(folders)) + j * width, accs, width, label=lab)
        ax.set_xticks(np.arange(len(folders)) + 0.4 - width / 2, folders, fontsize=8)
        ax.set_title("real folders (unshifted)")
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{doc['run_dir']}: accuracy under acquisition shifts ({doc['n_val']} held-out images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_strength(s: str) -> int:
    if s in LEVEL_NUMBERS:
        return LEVEL_NUMBERS[s]
    if s.isdigit() and int(s) in LEVELS:
        return int(s)
    raise argparse.ArgumentTypeError(f"strength must be one of {', '.join(LEVEL_NUMBERS)} (or 1, 2, 3), got {s!r}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="runs/NAME with export/manifest.json, best.pt and split.json")
    p.add_argument("--data", action="append", default=[], metavar="FOLDER",
                   help="a real labelled class-folder dataset, measured unshifted (repeatable)")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="held-out images, spread over the classes")
    p.add_argument("--shifts", nargs="+", default=[s for s in SHIFTS if s != "none"],
                   choices=[s for s in SHIFTS if s != "none"], help="which shifts (clean is always measured)")
    p.add_argument("--strengths", nargs="+", type=parse_strength, default=[1, 2, 3],
                   help="mild medium strong (or 1 2 3)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image selection and per-image shift seeds")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--out", default="", help="output folder (default: RUN_DIR/bench)")
    return p


def run(args: argparse.Namespace, command: str) -> dict:
    from cellcore.quality import PictureChecks
    from cellcore.manifest import ManifestError, read_manifest
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir / "export")
    ckpt_path = run_dir / manifest["model"].get("checkpoint", "best.pt")
    model, prep, classes = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path,
                                                 tta=manifest["model"].get("tta", "none"))
    if classes != manifest["classes"]:
        raise ManifestError(f"{run_dir}/export: manifest classes {manifest['classes']} differ from the checkpoint's")
    from train.distance import attach_from_export

    attach_from_export(model, manifest, run_dir / "export")  # PyTorch then outputs what the exported graphs do
    unc = manifest.get("uncertainty") or {}
    checks = PictureChecks.from_dict(unc.get("picture_checks"))
    folders = [load_folder(d, classes) for d in args.data]  # first: a folder with unknown classes fails fast
    val = load_val(run_dir, classes, args.images, args.seed)
    formats = load_formats(run_dir, manifest, model, classes, args.threads)
    strengths = sorted(set(args.strengths))
    shifts = list(dict.fromkeys(args.shifts))
    rows, conds = [], []
    for shift, strength in conditions(shifts, strengths):
        r, info = evaluate(val, shift, strength, prep, formats, classes, checks, args.seed)
        rows += r
        conds.append(info)
    for src in folders:
        r, info = evaluate(src, "none", 0, prep, formats, classes, checks, args.seed)
        rows += r
        conds.append(info)
    from benchmarks.latency import machine_info

    return {
        "run_dir": str(run_dir), "command": command, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info(), "load_average": list(_loadavg())},
        "model": manifest["model"].get("arch"), "version": manifest.get("version"), "classes": classes,
        "input_size": prep.input_size, "resize": prep.resize, "preprocessing": prep.to_dict(),
        "val_source": val.description, "n_val": int(len(val.labels)), "seed": args.seed,
        "settings": {"images": args.images, "shifts": ["none", *shifts], "strengths": strengths,
                     "levels": {str(k): v for k, v in LEVELS.items()}, "folders": [s.name for s in folders],
                     "folder_paths": [str(d) for d in args.data]},
        "shift_docs": {name: (fn.__doc__ or "").split("\n\n")[0].replace("\n", " ").strip()
                       for name, fn in SHIFTS.items()},
        "per_artifact_rules": bool(unc.get("per_artifact")),
        "formats": [{"label": f.label, "file": f.file, "format": f.fmt, "precision": f.precision,
                     "output_kind": f.kind, "temperature": f.rule.temperature, "threshold": f.rule.threshold,
                     "note": f.note} for f in formats],
        "picture_checks": checks.to_dict(),
        "conditions": conds, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
    }


def _loadavg() -> tuple[float, ...]:
    try:
        import os

        return os.getloadavg()
    except (OSError, AttributeError):
        return ()


def main(argv: list[str] | None = None) -> int:
    from cellcore.manifest import ManifestError
    from train.checkpoint import CheckpointError
    from train.data import BadImageError, DatasetError

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.images < 1:
        log.error("--images must be at least 1")
        return 2
    command = "python -m benchmarks.robustness " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        doc = run(args, command)
    except (ManifestError, CheckpointError, DatasetError, BadImageError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(doc, indent=1))
    md = format_markdown(doc)
    (out / "robustness.md").write_text(md + "\n")
    plot(doc, out / "robustness.png")
    print(md)
    log.info("wrote %s/robustness.{json,md,png} in %.0f s on %s", out, doc["seconds"], platform.node() or "?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
