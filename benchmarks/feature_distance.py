"""`python -m benchmarks.feature_distance`: would a distance in feature space flag what the model's confidence misses?

The uncertainty rule (cellcore.uncertainty) trusts the model's calibrated confidence, and on another lab's
cells the model is confidently wrong. A picture unlike every training cell can still land far from all of
them in the features the classifier reads. This measures that idea (Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples") on PyTorch, at several thresholds (export uses one):

1. features = the pooled 320-d (xxs) vector before the classifier layer, averaged over the test-time views as
   the exported graph averages the logits (train.models.Classifier.features);
2. fitted on the run's training split: one mean per class and one shared covariance (train.distance, the
   module `python -m export` appends to the exported graphs);
3. distance = the smallest squared Mahalanobis distance to a class mean, divided by the dimension;
4. threshold = a quantile of the validation split's distances (0.95: 5% of PBC validation cells exceed it,
   the usual "95% of in-distribution kept" operating point); flagged = today's rule OR distance > threshold.

Reported for the run's test split, every labelled folder given (e.g. crosslab_dev, never trained on) and the
non-cell set: share flagged, and how often the answers not flagged are right (with 95% intervals).

    python -m benchmarks.feature_distance --run-dir runs/odbg80 --data ../shared/data/crosslab_dev
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")

QUANTILES = (0.9, 0.95, 0.98, 0.99)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.feature_distance",
                                description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--run-dir", required=True, help="an exported run (its export/manifest.json gives today's rule)")
    p.add_argument("--data", nargs="*", default=[], help="labelled folders to measure as well (e.g. crosslab_dev)")
    p.add_argument("--noncell", default="runs/data/noncell",
                   help="the non-cell set (python -m benchmarks.noncell --data ...); skipped if missing")
    p.add_argument("--quantiles", nargs="+", type=float, default=list(QUANTILES),
                   help="validation quantiles tried as thresholds (default %(default)s)")
    p.add_argument("--shrink", type=float, default=None,
                   help="covariance shrinkage (default: train.distance's choice for the training split's size)")
    p.add_argument("--out", default="", help="output stem (default <run-dir>/bench/feature_distance)")
    return p


def _distance(dist, feats: np.ndarray) -> np.ndarray:
    """[N, D] features -> [N] distances, through the very module export puts in the graph (float32)."""
    import torch

    with torch.no_grad():
        return dist(torch.from_numpy(feats.astype(np.float32)))[:, 0].double().numpy()


def _model_outputs(model, images_u8: np.ndarray, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """[N, S, S, 3] uint8 -> (features [N, D], logits [N, C]) float64, eval mode."""
    import torch

    feats, logits = [], []
    head = model.backbone.get_classifier()
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            x = torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch].transpose(0, 3, 1, 2))).float() / 255
            f = model.features(x)  # [B, D]
            feats.append(f.double().numpy())
            logits.append(head(f).double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def _summary(flagged: np.ndarray, right: np.ndarray) -> dict:
    from cellcore.uncertainty import wilson

    kept = ~flagged
    k, n = int(right[kept].sum()), int(kept.sum())
    return {"flagged": float(flagged.mean()) if len(flagged) else 0.0, "kept": n,
            "right_of_kept": k / n if n else None, "right_of_kept_ci95": wilson(k, n) if n else None}


def measure(run_dir: Path, data: list[Path], noncell: Path | None, quantiles: list[float],
            shrink: float | None = None) -> dict:
    from cellcore.manifest import read_manifest
    from cellcore.uncertainty import rule_for
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import ImageCache, load_rgb, load_split_samples, scan_onto_classes
    from train.distance import FeatureDistance

    manifest = read_manifest(run_dir / "export")
    ckpt = load_checkpoint(run_dir / manifest["model"]["checkpoint"])
    model, prep, classes = model_from_checkpoint(ckpt, run_dir / "best.pt", tta=manifest["model"].get("tta", "none"))
    model.eval()
    # today's rule without any distance the export may already carry: the columns below add it at each quantile
    rule = dataclasses.replace(rule_for(manifest, "best.pt"), max_distance=None)

    def outputs(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        cache = ImageCache.build(samples, prep)
        f, lg = _model_outputs(model, cache.images)
        return f, lg, cache.labels, cache.paths

    split = run_dir / "split.json"
    f_tr, _, y_tr, _ = outputs(load_split_samples(split, "train"))
    dist = FeatureDistance.fit(f_tr, y_tr, shrink)
    f_va, _, _, _ = outputs(load_split_samples(split, "val"))
    d_va = _distance(dist, f_va)
    thresholds = {str(q): float(np.quantile(d_va, q)) for q in quantiles}
    log.info("fitted on %d training images; validation distance quantiles %s", len(f_tr), thresholds)

    sets = {"test split": load_split_samples(split, "test")}
    for folder in data:
        sets[folder.name] = scan_onto_classes(folder, classes)
    res = {"run_dir": str(run_dir), "tta": manifest["model"].get("tta", "none"), "fitted_on": len(f_tr),
           "thresholds": thresholds, "sets": {}, "noncell": None}
    for name, samples in sets.items():
        f, lg, y, paths = outputs(samples)
        probs = rule.probabilities(lg.astype(np.float32))
        problems = [rule.checks.problems(load_rgb(Path(samples.root) / p)) for p in paths]
        base = rule.flagged(probs, problems)
        right = probs.argmax(1) == y
        d = _distance(dist, f)
        res["sets"][name] = {"images": int(len(y)), "accuracy": float(right.mean()), "rule": _summary(base, right),
                             "with_distance": {q: _summary(base | (d > t), right) for q, t in thresholds.items()}}
    if noncell is not None and noncell.is_dir():
        files = sorted(noncell.rglob("*.png"))
        rgbs = [load_rgb(f) for f in files]
        x = np.stack([np.asarray(prep.apply(im), dtype=np.uint8) for im in rgbs])  # [N, S, S, 3]
        f, lg = _model_outputs(model, x)
        probs = rule.probabilities(lg.astype(np.float32))
        base = rule.flagged(probs, [rule.checks.problems(im) for im in rgbs])
        d = _distance(dist, f)
        res["noncell"] = {"images": len(files), "rule": int(base.sum()),
                          "with_distance": {q: int((base | (d > t)).sum()) for q, t in thresholds.items()},
                          "missed_by_rule": [{"file": fl.name, "top": classes[int(p.argmax())], "distance": float(dd),
                                              "val_quantile": float((d_va < dd).mean())}
                                             for fl, p, dd, b in zip(files, probs, d, base) if not b]}
    return res


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def format_table(res: dict) -> str:
    qs = list(res["thresholds"])
    head = ["set", "images", "accuracy", "today's rule: flagged / right of kept (n)"]
    head += [f"+ distance > val q{q}: flagged / right of kept (n)" for q in qs]
    lines = [f"Feature distance on `{res['run_dir']}` (PyTorch, TTA {res['tta']}; fitted on {res['fitted_on']} "
             f"training images; thresholds {', '.join(f'q{q} = {t:.3f}' for q, t in res['thresholds'].items())})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda s: f"{_pct(s['flagged'])} / {_pct(s['right_of_kept'])} ({s['kept']})"  # noqa: E731
    for name, s in res["sets"].items():
        lines.append(f"| {name} | {s['images']} | {_pct(s['accuracy'])} | {cell(s['rule'])} | "
                     + " | ".join(cell(s["with_distance"][q]) for q in qs) + " |")
    nc = res["noncell"]
    if nc:
        lines.append(f"| non-cell set (flagged) | {nc['images']} | – | {nc['rule']}/{nc['images']} | "
                     + " | ".join(f"{nc['with_distance'][q]}/{nc['images']}" for q in qs) + " |")
        for m in nc["missed_by_rule"]:
            lines.append(f"\n- missed by today's rule: `{m['file']}` answered {m['top']}, distance {m['distance']:.3f} "
                         f"(above {100 * m['val_quantile']:.1f}% of validation cells)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cellcore.manifest import ManifestError
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    run_dir = Path(args.run_dir)
    bad = [q for q in args.quantiles if not 0 < q < 1]
    if bad:
        log.error("--quantiles %s: each must lie strictly between 0 and 1", bad)
        return 2
    try:
        res = measure(run_dir, [Path(d) for d in args.data], Path(args.noncell) if args.noncell else None,
                      args.quantiles, args.shrink)
    except (CheckpointError, DatasetError, ManifestError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    stem = Path(args.out) if args.out else run_dir / "bench" / "feature_distance"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    table = format_table(res)
    stem.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
