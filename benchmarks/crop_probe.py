"""`python -m benchmarks.crop_probe`: how a trained run's accuracy moves with the crop it is shown, without colour or
without everything but the nucleus.

A diagnostic, not a training recipe: it re-frames the pictures a checkpoint is evaluated on (the nucleus share
of the square, `cell_fill`, and the largest square, `cell_max_side`, of `cellcore.preprocess.cell_box`),
drops their colour (`--gray`), or paints everything outside the nucleus in the picture's background colour
(`--nucleus-only`: is the cytoplasm what the model reads?), and reports accuracy per class on the run's validation and test splits and on every
labelled folder given. The model stays as trained, so a framing that helps another lab's cells here tells
whether framing is what keeps them from being right; choosing a framing by such a folder's labels would be
fitting to it, which is why the validation split is reported beside it.

    python -m benchmarks.crop_probe --run-dir runs/odsharp80 --data ../shared/data/crosslab_dev \\
        --fill 0.55 0.6 0.65 --max-side 1.6 1.0 --gray --nucleus-only
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.crop_probe",
                                description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--run-dir", required=True, help="a training run with --crop cell (best.pt, split.json)")
    p.add_argument("--data", nargs="*", default=[], help="labelled folders to measure as well (e.g. crosslab_dev)")
    p.add_argument("--fill", nargs="+", type=float, default=None,
                   help="cell_fill values to try (default: the run's own)")
    p.add_argument("--max-side", nargs="+", type=float, default=None,
                   help="cell_max_side values to try (default: the run's own)")
    p.add_argument("--gray", action="store_true", help="also show every picture in grayscale (the run's crop)")
    p.add_argument("--nucleus-only", action="store_true",
                   help="also show every picture with all but its nucleus in its background colour (the run's crop)")
    p.add_argument("--tta", default="dihedral8", choices=("none", "dihedral8"),
                   help="test-time augmentation, as the export puts it in the graph (default %(default)s)")
    p.add_argument("--out", default="", help="output stem (default <run-dir>/bench/crop_probe)")
    return p


def _gray(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] uint8 -> the same, every channel the luma (ITU-R 601)."""
    y = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _nucleus_only(images: np.ndarray, grow: int = 1) -> np.ndarray:
    """[N, S, S, 3] uint8 -> the same with every pixel outside the nucleus set to the picture's background colour.

    The nucleus is found as `cellcore.preprocess.cell_box` finds it (red-channel optical density above
    max(0.3, half its 99.5th percentile)), grown by `grow` px so its edge stays; the background is the median colour
    of the picture's palest 30% (lowest total optical density)."""
    from cellcore.preprocess import _dilate

    out = images.copy()
    for img, o in zip(images, out):
        od = -np.log(np.maximum(img.astype(np.float32), 1.0) / 255.0)          # [S, S, 3]
        red = od[..., 0]
        mask = _dilate(red > max(0.3, 0.5 * float(np.percentile(red, 99.5))), grow)
        total = od.sum(-1)
        o[~mask] = np.median(img[total <= np.percentile(total, 30)], axis=0).astype(np.uint8)
    return out


def probe(run_dir: Path, data: list[str], fills: list[float] | None, max_sides: list[float] | None,
          gray: bool = False, tta: str = "dihedral8", nucleus_only: bool = False) -> list[dict]:
    import torch

    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import ImageCache, load_split_samples, scan_onto_classes
    from train.engine import predict_logits, to_tensor_nchw

    ckpt = load_checkpoint(run_dir / "best.pt")
    model, prep, classes = model_from_checkpoint(ckpt, run_dir / "best.pt", tta=tta)
    if prep.resize != "cell_square_crop_then_resize":
        raise ValueError(f"{run_dir}: trained with {prep.resize}; the probe re-frames nucleus-centred crops only")
    sets = {"pbc val": load_split_samples(run_dir / "split.json", "val"),
            "pbc test": load_split_samples(run_dir / "split.json", "test")}
    sets.update({Path(d).name: scan_onto_classes(d, classes, ckpt.get("class_map")) for d in data})
    # (fill, max side, view): view is "colour", "gray" or "nucleus"
    variants = [(f, m, "colour")
                for f, m in itertools.product(fills or [prep.cell_fill], max_sides or [prep.cell_max_side])]
    variants += [(prep.cell_fill, prep.cell_max_side, v) for v, on in (("gray", gray), ("nucleus", nucleus_only)) if on]
    views = {"colour": lambda a: a, "gray": _gray, "nucleus": _nucleus_only}
    rows = []
    for fill, max_side, view in variants:
        p2 = dataclasses.replace(prep, cell_fill=fill, cell_max_side=max(max_side, prep.cell_min_side))
        gr = view == "gray"
        row = {"cell_fill": fill, "cell_max_side": p2.cell_max_side, "gray": gr, "nucleus_only": view == "nucleus",
               "trained": fill == prep.cell_fill and p2.cell_max_side == prep.cell_max_side and view == "colour"}
        for name, samples in sets.items():
            cache = ImageCache.build(samples, p2)
            images = views[view](cache.images)
            pred = predict_logits(model, to_tensor_nchw(images), torch.device("cpu")).argmax(1).numpy()
            lab = np.asarray(cache.labels)
            row[name] = {"accuracy": float((pred == lab).mean()), "n": int(len(lab)),
                         "recall": {classes[c]: float((pred[lab == c] == c).mean()) for c in np.unique(lab)}}
        log.info("fill %.2f, max side %.2f%s: %s", fill, p2.cell_max_side, "" if view == "colour" else ", " + view,
                 "  ".join(f"{k} {v['accuracy']:.1%}" for k, v in row.items() if isinstance(v, dict)))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], run_dir: Path, tta: str) -> str:
    names = [k for k, v in rows[0].items() if isinstance(v, dict)]
    lines = [f"# Crop probe: `{run_dir}` (TTA {tta}), accuracy (recall per class for the last set)", "",
             "| crop | " + " | ".join(names) + " | per class, " + names[-1] + " |",
             "|---" * (len(names) + 2) + "|"]
    for r in rows:
        crop = f"fill {r['cell_fill']}, max side {r['cell_max_side']}" + (", gray" if r["gray"] else "")
        crop += ", nucleus only" if r.get("nucleus_only") else ""
        crop += " (as trained)" if r["trained"] else ""
        rec = ", ".join(f"{c} {v:.2f}" for c, v in r[names[-1]]["recall"].items())
        lines.append(f"| {crop} | " + " | ".join(f"{r[n]['accuracy']:.1%}" for n in names) + f" | {rec} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    run_dir = Path(args.run_dir)
    try:
        rows = probe(run_dir, args.data, args.fill, args.max_side, args.gray, args.tta, args.nucleus_only)
    except (CheckpointError, DatasetError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    stem = Path(args.out) if args.out else run_dir / "bench" / "crop_probe"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    md = to_markdown(rows, run_dir, args.tta)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
