"""Pictures that are not a single white cell, made from real PBC photos and drawing: the abstention test set.

python -m benchmarks.noncell --data ../shared/data/pbc_dev --out runs/data/noncell
python -m benchmarks.noncell --run-dir runs/NAME      # + how each exported format answers them


Each kind is something a lab could photograph by mistake and the model must flag as uncertain:
an empty field (background only), red cells only, a platelet clump, a badly blurred cell, a
photo of printed text, and a hand. All are built from real PBC pixels where that makes sense
(backgrounds, red cells, platelets, cells), deterministically from a seed.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

log = logging.getLogger(__name__)

KINDS = ("empty_field", "red_cells_only", "platelet_clump", "blurred_cell", "text", "hand")


def _pbc(data: Path, cls: str, n: int, rng: random.Random) -> list[Image.Image]:
    files = sorted((data / cls).glob("*.jpg"))
    return [Image.open(f).convert("RGB") for f in rng.sample(files, min(n, len(files)))]


def _corner_tiles(img: Image.Image, tile: int) -> list[Image.Image]:
    w, h = img.size
    return [img.crop((x, y, x + tile, y + tile)) for x, y in ((0, 0), (w - tile, 0), (0, h - tile), (w - tile, h - tile))]


def make(kind: str, data: Path, seed: int, size: int = 360) -> Image.Image:
    """One picture of `kind` (size x size RGB)."""
    rng = random.Random(f"{kind}-{seed}")
    nprng = np.random.default_rng(rng.randrange(2**31))
    if kind == "empty_field":
        # the smear's own background colour (brightest tenth of a real field), with lamp falloff and noise
        src = np.asarray(_pbc(data, "neutrophil", 1, rng)[0], dtype=np.float32)
        bg = np.percentile(src.reshape(-1, 3), 95, axis=0)
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        vignette = 1 - 0.25 * (xx ** 2 + yy ** 2)
        arr = bg[None, None] * vignette[..., None] + nprng.normal(0, 3, (size, size, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "red_cells_only":
        # a 2x2 mosaic of real field corners (red cells and background; the white cell is central in PBC)
        tiles = [t for img in _pbc(data, "lymphocyte", 2, rng) for t in _corner_tiles(img, 100)]
        canvas = Image.new("RGB", (200, 200))
        for i, t in enumerate(rng.sample(tiles, 4)):
            canvas.paste(t, ((i % 2) * 100, (i // 2) * 100))
        return canvas.resize((size, size), Image.BILINEAR)
    if kind == "platelet_clump":
        # several real platelet-image centres pasted on red cells: no white cell in the picture
        base = make("red_cells_only", data, seed, size)
        for img in _pbc(data, "platelet", 5, rng):
            w, h = img.size
            patch = img.crop((w // 2 - 30, h // 2 - 30, w // 2 + 30, h // 2 + 30))
            mask = Image.fromarray((np.asarray(patch.convert("L")) < 170).astype(np.uint8) * 255).filter(
                ImageFilter.GaussianBlur(2))
            base.paste(patch, (size // 2 - 60 + rng.randrange(60), size // 2 - 60 + rng.randrange(60)), mask)
        return base
    if kind == "blurred_cell":
        cls = rng.choice(["neutrophil", "lymphocyte", "monocyte", "eosinophil"])
        return _pbc(data, cls, 1, rng)[0].resize((size, size)).filter(ImageFilter.GaussianBlur(rng.uniform(10, 16)))
    if kind == "text":
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in nprng.integers(225, 255, 3)))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=rng.randint(18, 30)) if hasattr(ImageFont, "load_default") else None
        words = "patient sample slide report hematology count result date lab microscope".split()
        for row in range(12):
            draw.text((10, 10 + row * 30), " ".join(rng.choice(words) for _ in range(4)), fill=(20, 20, 30), font=font)
        return canvas
    if kind == "hand":
        # skin-coloured palm and fingers, shaded, on a desk: a photo taken by mistake
        v = int(nprng.integers(90, 170))  # a grey-brown desk
        canvas = Image.new("RGB", (size, size), (v, int(v * 0.9), int(v * 0.8)))
        skin = (rng.randint(170, 230), rng.randint(120, 170), rng.randint(90, 140))
        draw = ImageDraw.Draw(canvas)
        draw.ellipse((size * 0.2, size * 0.45, size * 0.8, size * 1.1), fill=skin)
        for i in range(4):
            x = size * (0.25 + 0.13 * i)
            draw.rounded_rectangle((x, size * 0.1 + 20 * abs(i - 1.5), x + size * 0.1, size * 0.6), 20, fill=skin)
        shade = np.linspace(0.8, 1.1, size)[None, :, None]
        arr = np.asarray(canvas.filter(ImageFilter.GaussianBlur(3)), dtype=np.float32) * shade
        return Image.fromarray(np.clip(arr + nprng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))
    raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


def write_set(data: Path, out: Path, per_kind: int = 5) -> list[Path]:
    """out/<kind>/<kind>_<i>.png for every kind; returns the files."""
    files = []
    for kind in KINDS:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            path = out / kind / f"{kind}_{i}.png"
            make(kind, data, i).save(path)
            files.append(path)
    return files


def flagged_by_format(run_dir: Path, files: list[Path], panel: str | None = None) -> dict:
    """{format file: {kind: [flagged?, ...]}} under each artifact's own uncertainty rule (and PyTorch's), on
    `panel` (cellcore.panels; None: every class)."""
    import torch

    from cellcore.uncertainty import rule_for
    from cellcore.manifest import artifact_path, read_manifest
    from export.runtimes import ExecutorchRunner, OnnxRunner
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import load_rgb

    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    model, prep, _ = model_from_checkpoint(load_checkpoint(run_dir / manifest["model"]["checkpoint"]),
                                           tta=manifest["model"].get("tta", "none"))
    from train.distance import attach_from_export

    attach_from_export(model, manifest, export_dir)  # PyTorch then outputs what the exported graphs do
    rgbs = [load_rgb(f) for f in files]
    x = np.stack([np.asarray(prep.apply(im), dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in rgbs])  # [N,3,S,S]
    runners = {"best.pt": ("logits", lambda a: model(torch.from_numpy(a)).detach().numpy())}
    for e in manifest["artifacts"]:
        if e["format"] in ("onnx", "executorch"):
            path = artifact_path(export_dir, e)
            runners[e["file"]] = (e.get("output_kind", "logits"),
                                  OnnxRunner(path) if e["format"] == "onnx" else ExecutorchRunner(path))
    out: dict = {}
    for name, (kind, run) in runners.items():
        rule = rule_for(manifest, name, panel)
        checks = [rule.checks.problems(im) for im in rgbs]
        with torch.no_grad():
            raw = run(x)  # [N, C] or [N, C + 1] (the feature distance column)
        probs = rule.probabilities(raw, kind)  # [N, C] calibrated
        dists = rule.distances(raw)
        dists = [None] * len(files) if dists is None else list(dists)
        off = rule.off_panel(raw)
        out[name] = {}
        for f, p, pr, d, o in zip(files, probs, checks, dists, off):
            out[name].setdefault(f.parent.name, []).append(
                {"file": f.name, "flagged": rule.uncertain(float(p.max()), pr, int(p.argmax()), d, bool(o)),
                 "top": manifest["classes"][int(p.argmax())], "p": round(float(p.max()), 4), "problems": pr,
                 "distance": None if d is None else round(float(d), 4), "far": rule.far(d), "off_panel": bool(o)})
    return out


def measure_folders(folders: list[Path], run_dir: Path | None = None) -> int:
    """min / median / max of cellcore.quality's measures over each folder's images, and how many the checks flag.

    The checks are the defaults, or with run_dir that run's exported ones (its stain colour range included).
    """
    from cellcore.quality import PictureChecks, measure, nucleus_hue
    from train.data import IMAGE_EXTS, load_rgb

    if run_dir is not None:
        from cellcore.manifest import read_manifest

        checks = PictureChecks.from_dict(read_manifest(run_dir / "export")["uncertainty"].get("picture_checks"))
    else:
        checks = PictureChecks()
    print(f"checks: {checks.to_dict()}")
    print("| folder | images | stain share min / median / max | sharpness min / median / max | nucleus red min / median "
          "/ max | nucleus blue min / median / max | flagged by stain share or sharpness | flagged by stain colour |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in folders:
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        rgbs = (load_rgb(f) for f in files)
        m, hues, by_colour = [], [], 0
        for rgb in rgbs:
            m.append(measure(rgb))
            h = nucleus_hue(rgb)
            hues.append(h if h is not None else (np.nan, np.nan))
            by_colour += any(x.startswith("stain colour") for x in checks.problems(rgb))
        m, hues = np.array(m), np.array(hues)
        flagged = int(((m[:, 0] < checks.min_stain) | (m[:, 1] < checks.min_sharpness)).sum())
        q = lambda v, f: f"{np.nanmin(v):{f}} / {np.nanmedian(v):{f}} / {np.nanmax(v):{f}}"  # noqa: E731
        print(f"| {folder} | {len(files)} | {q(m[:, 0], '.4f')} | {q(m[:, 1], '.3f')} | {q(hues[:, 0], '.3f')} | "
              f"{q(hues[:, 1], '.3f')} | {flagged} | {by_colour} |")
    return 0


def sharpness_by_class(folders: list[Path], size: int = 128, min_side: float = 0.2) -> int:
    """Median sharpness (cellcore.quality's measure) of what a cell-crop model sees, per class subfolder.

    Why: it showed that blur was a class cue in PBC (erythroblast and platelet crops are zoomed in, so
    softer) and that another lab's crops are softer than any PBC class, so they were answered with those
    classes (README, "Cells from other labs").
    """
    from cellcore.preprocess import Preprocessing
    from cellcore.quality import _sharpness
    from train.data import IMAGE_EXTS, load_rgb

    prep = Preprocessing(size, resize="cell_square_crop_then_resize", cell_min_side=min_side)
    print(f"| folder | class | images | sharpness of the {size} px cell crop (min side {min_side}): 5th percentile / "
          "median |")
    print("|---|---|---|---|")
    for folder in folders:
        for cls in sorted(d for d in folder.iterdir() if d.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            # on the crop at its own size (measure() would resample it to 128 px first; equal at 128)
            sharp = [_sharpness(np.asarray(prep.apply(load_rgb(f)), dtype=np.float32)) for f in files]
            print(f"| {folder.name} | {cls.name} | {len(files)} | {np.percentile(sharp, 5):.3f} / {np.median(sharp):.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/pbc_dev", help="PBC folder the real pixels come from")
    p.add_argument("--out", default="runs/data/noncell")
    p.add_argument("--per-kind", type=int, default=5)
    p.add_argument("--run-dir", help="also run every exported format of this run on the set; table in <run>/bench/ (with "
                        "--measure: count what this run's exported checks flag)")
    p.add_argument("--panel", default=None, help="with --run-dir: apply each file's rule on this panel, as the app "
                   "does when a lab picks it (cellcore.panels: wbc5, wbc6 or a class list); tables named after it")
    p.add_argument("--measure", nargs="+", metavar="FOLDER",
                   help="instead: the picture-check measures (stain share, sharpness) of every image in these folders")
    p.add_argument("--by-class", action="store_true",
                   help="with --measure: median sharpness of the cell crop per class subfolder")
    p.add_argument("--crop-size", type=int, default=128, help="with --by-class: the crop's side in pixels (64: what "
                   "the crosslab preset's model sees)")
    p.add_argument("--min-side", type=float, default=0.2, help="with --by-class: the crop's minimum side (crosslab "
                   "preset: 0.45)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.measure and args.by_class:
        return sharpness_by_class([Path(f) for f in args.measure], args.crop_size, args.min_side)
    if args.measure:
        return measure_folders([Path(f) for f in args.measure], Path(args.run_dir) if args.run_dir else None)
    files = write_set(Path(args.data), Path(args.out), args.per_kind)
    log.info("wrote %d pictures of %d kinds into %s", len(files), len(KINDS), args.out)
    if not args.run_dir:
        return 0
    import json

    run_dir = Path(args.run_dir)
    res = flagged_by_format(run_dir, files, args.panel)
    on = f", panel {args.panel}" if args.panel else ""
    lines = [f"# Non-cell pictures flagged as uncertain ({run_dir}, {args.per_kind} per kind{on})", "",
             "| format | " + " | ".join(KINDS) + " | all |", "|---|" + "---|" * (len(KINDS) + 1)]
    for name, kinds in res.items():
        cells = [f"{sum(r['flagged'] for r in kinds[k])}/{len(kinds[k])}" for k in KINDS]
        total = sum(r["flagged"] for k in KINDS for r in kinds[k])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total}/{len(files)} |")
    bench = run_dir / "bench"
    bench.mkdir(exist_ok=True)
    stem = "noncell" + (f"_panel_{args.panel.replace(',', '+')}" if args.panel else "")
    (bench / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (bench / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
