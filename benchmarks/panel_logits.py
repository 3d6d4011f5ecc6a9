"""`python -m benchmarks.panel_logits`: accuracy of saved logits on every class and on a panel, per run and per recipe.

Reads the .npz files `python -m train.evaluate --save-logits` writes (benchmarks.tune_cpu_preset keeps one per
run and evaluation folder, e.g. runs/gpu4/tune_xs48_s0/eval/crosslab_dev.npz) and applies a cellcore.panels
panel the way the app does: the answer is the most probable class on the panel. Runs named <recipe>_s<seed>
are also averaged per recipe. --ensemble also scores the mean of the files' logits, as one model that ran every
run and averaged their answers would (a deep ensemble; the runs must have scored the same pictures, i.e. share a
split). Prints a markdown table; --out writes it and a JSON beside it.

    python -m benchmarks.panel_logits runs/gpu4/tune_*/eval/crosslab_dev.npz --panel wbc5
    python -m benchmarks.panel_logits runs/{xs48,xs48_mixup}/eval/test_tta.npz --ensemble
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cellcore.panels import PanelError, resolve_panel

log = logging.getLogger("benchmarks")


def run_name(path: Path) -> str:
    """runs/gpu4/tune_xs48_s0/eval/crosslab_dev.npz -> xs48_s0 (the folder above eval/, without tune_)."""
    folder = path.parent.parent.name if path.parent.name == "eval" else path.parent.name
    return folder.removeprefix("tune_")


def load(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """One .npz -> (logits [N, C] float32, labels [N] int64, classes, picture paths [N] or None in older files)."""
    d = np.load(path)
    return d["logits"], d["labels"], [str(c) for c in d["classes"]], (d["paths"] if "paths" in d.files else None)


def ensemble(files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The mean of several runs' logits for the same pictures (what TTA does over views, here over runs).

    Refuses files that did not score the same pictures in the same order with the same classes: runs with other
    seeds have other test splits, and an average over different pictures would be meaningless.
    """
    if len(files) < 2:
        raise ValueError("--ensemble needs at least two .npz files")
    first = load(files[0])
    members = [first[0]]
    for f in files[1:]:
        logits, labels, classes, paths = load(f)
        if first[3] is None or paths is None:
            raise ValueError(f"{f if paths is None else files[0]}: no picture paths saved (made before train.evaluate "
                             "saved them); cannot check that the runs scored the same pictures")
        if classes != first[2] or len(paths) != len(first[3]) or not (paths == first[3]).all() \
                or not (labels == first[1]).all():
            raise ValueError(f"{f} and {files[0]} did not score the same pictures with the same classes "
                             "(runs with different seeds have different splits): they cannot be averaged")
        members.append(logits)
    return np.mean(members, axis=0), first[1], first[2]


def score(path: Path, panel: str) -> dict:
    """One .npz -> accuracy on every class and on the panel, and per-class recall on the panel."""
    logits, labels, classes, _ = load(path)
    return score_logits(logits, labels, classes, panel, str(path))


def score_logits(logits: np.ndarray, labels: np.ndarray, classes: list[str], panel: str, file: str) -> dict:
    """logits [N, C], labels [N] -> accuracy on every class and on the panel, and per-class recall on the panel."""
    on = resolve_panel(panel, classes)
    masked = logits if on is None else np.where(np.isin(np.arange(len(classes)), on), logits, -np.inf)
    pred_all, pred_panel = logits.argmax(1), masked.argmax(1)
    mine = np.isin(labels, on) if on is not None else np.ones(len(labels), bool)  # images of the panel's classes
    recall = {c: f"{int((pred_panel[labels == i] == i).sum())}/{int((labels == i).sum())}"
              for i, c in enumerate(classes) if (labels == i).any()}
    return {"file": file, "images": int(len(labels)), "accuracy": float((pred_all == labels).mean()),
            "accuracy_panel": float((pred_panel == labels).mean()),
            # a panel is for slides without the other classes: on a folder that has them (PBC), only this is fair
            "panel_class_images": int(mine.sum()),
            "accuracy_panel_class_images": float((pred_all == labels)[mine].mean()) if mine.any() else None,
            "accuracy_panel_class_images_on_panel": float((pred_panel == labels)[mine].mean()) if mine.any() else None,
            "off_panel_first_answer": float((~np.isin(pred_all, on)).mean()) if on is not None else 0.0,
            "right_on_panel": recall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.panel_logits", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="train.evaluate --save-logits .npz files")
    p.add_argument("--panel", default="wbc5", help="cellcore.panels name or comma-separated classes (default wbc5)")
    p.add_argument("--ensemble", action="store_true", help="also score the mean of all the files' logits (the runs "
                   "must have scored the same pictures: the same split)")
    p.add_argument("--out", type=Path, help="write the table here (.md) and its numbers beside it (.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        files = sorted(args.files)
        rows = {run_name(f): score(f, args.panel) for f in files}
        if args.ensemble:
            name = "mean of " + " + ".join(run_name(f) for f in files)
            rows[name] = score_logits(*ensemble(files), args.panel, ", ".join(map(str, files)))
    except (PanelError, OSError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    lines = [f"| run | images | accuracy, every class | accuracy, panel {args.panel} | images of the panel's classes: "
             f"accuracy every class / panel | first answer off the panel | right per class on the panel |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images']} | {r['accuracy']:.1%} | {r['accuracy_panel']:.1%} | "
                     f"{r['panel_class_images']}: {r['accuracy_panel_class_images']:.1%} / "
                     f"{r['accuracy_panel_class_images_on_panel']:.1%} | {r['off_panel_first_answer']:.1%} | "
                     + ", ".join(f"{c} {v}" for c, v in r["right_on_panel"].items()) + " |")
    recipes: dict[str, list[dict]] = defaultdict(list)
    for name, r in rows.items():
        recipes[re.sub(r"_s\d+$", "", name)].append(r)
    lines += ["", f"| recipe | runs | accuracy, every class: mean (per run) | accuracy, panel {args.panel}: mean "
                  "(per run) | images of the panel's classes, on the panel: mean (per run) |", "|---|---|---|---|---|"]
    for recipe, rs in recipes.items():
        a, b = [r["accuracy"] for r in rs], [r["accuracy_panel"] for r in rs]
        c = [r["accuracy_panel_class_images_on_panel"] or 0.0 for r in rs]
        lines.append(f"| {recipe} | {len(rs)} | {np.mean(a):.1%} ({', '.join(f'{v:.1%}' for v in a)}) | "
                     f"{np.mean(b):.1%} ({', '.join(f'{v:.1%}' for v in b)}) | "
                     f"{np.mean(c):.1%} ({', '.join(f'{v:.1%}' for v in c)}) |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"panel": args.panel, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
