"""How closely each exported file's logits and feature distance follow the fp32 ONNX file's, on validation photos.

python -m benchmarks.int8_fidelity --run-dir runs/xs48 [--images 300] [--files OLD.onnx OLD.pte ...]

verify gates accuracy; this looks at the raw outputs the uncertainty rule thresholds. A quantised file whose
output is rounded to one 8-bit grid returns few distinct values (27 distances in 300 pictures for runs/xs48's
int8 files before session 13), so a picture near a threshold falls on either side by rounding. Per file: the
distinct distances and logits, the distance's mean absolute and relative difference from fp32, its Spearman
rank correlation with fp32, and the largest logit difference. Writes runs/RUN/bench/int8_fidelity.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)


def compare(out: np.ndarray, ref: np.ndarray, n_classes: int) -> dict:
    """[N, C + 1] outputs of a file and of the fp32 reference (logits, then the distance column) -> numbers."""
    d, dr = out[:, n_classes].astype(np.float64), ref[:, n_classes].astype(np.float64)
    return {"images": len(out), "distinct_distances": int(len(np.unique(d))),
            "distinct_logits_first_class": int(len(np.unique(out[:, 0]))),
            "distance_mean_abs_diff": float(np.abs(d - dr).mean()),
            "distance_mean_rel_diff": float(np.abs(d / dr - 1).mean()),
            "distance_spearman": float(np.corrcoef(_ranks(d), _ranks(dr))[0, 1]),
            "logit_max_abs_diff": float(np.abs(out[:, :n_classes] - ref[:, :n_classes]).max()),
            "agreement": float((out[:, :n_classes].argmax(1) == ref[:, :n_classes].argmax(1)).mean())}


def run_file(path: Path, x: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] float32 in 0..1 -> [N, C + 1] through the file's own runtime (ExecuTorch files: batch 1)."""
    from export.runtimes import ExecutorchRunner, OnnxRunner

    if path.suffix == ".onnx":
        r = OnnxRunner(path)
        return np.concatenate([r(x[i:i + 64]) for i in range(0, len(x), 64)])
    r = ExecutorchRunner(path)
    return np.concatenate([r(x[i:i + 1]) for i in range(len(x))])


def measure(run_dir: Path, images: int, extra: list[Path]) -> dict:
    from cellcore.manifest import artifact_path, read_manifest
    from cellcore.preprocess import Preprocessing
    from train.data import ImageCache, Samples, load_split_samples

    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    n = len(manifest["classes"])
    onnx_like = [e for e in manifest["artifacts"] if e["format"] in ("onnx", "executorch")]
    if not any(e.get("feature_distance_column") == n for e in onnx_like):
        raise ValueError(f"{export_dir}: its files carry no feature distance column (exported with "
                         "--no-feature-distance?); nothing to compare")
    ref_entry = next((e for e in onnx_like if e["format"] == "onnx" and e["precision"] == "fp32"), None)
    if ref_entry is None:
        raise ValueError(f"{export_dir}: no onnx fp32 file to compare with; export it (--formats onnx_fp32 ...)")
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    samples = load_split_samples(run_dir / "split.json", "val")
    samples = Samples(samples.root, samples.paths[:images], samples.labels[:images], samples.classes)
    cache = ImageCache.build(samples, prep)
    x = cache.images.transpose(0, 3, 1, 2).astype(np.float32) / 255  # [N, 3, S, S] float32 in 0..1
    ref = run_file(artifact_path(export_dir, ref_entry), x)
    files = [artifact_path(export_dir, e) for e in onnx_like if e is not ref_entry] + list(extra)
    rows = {}
    for f in files:
        rows[str(f)] = {"size_bytes": f.stat().st_size, **compare(run_file(f, x), ref, n)}
        log.info("%s: %s", f.name, rows[str(f)])
    return {"run": str(run_dir), "reference": ref_entry["file"], "images": len(x), "rows": rows}


def format_markdown(result: dict, command: str) -> str:
    lines = [f"# Exported outputs against {result['reference']} ({result['run']}, {result['images']} validation photos)",
             "", f"`{command}`", "",
             "| file | size MB | distinct distances | distinct logits (class 0) | distance mean abs diff | "
             "distance mean rel diff | distance Spearman | max abs logit diff | agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f, r in result["rows"].items():
        lines.append(f"| {f} | {r['size_bytes'] / 1e6:.2f} | {r['distinct_distances']} | "
                     f"{r['distinct_logits_first_class']} | {r['distance_mean_abs_diff']:.4f} | "
                     f"{r['distance_mean_rel_diff']:.1%} | {r['distance_spearman']:.3f} | "
                     f"{r['logit_max_abs_diff']:.3f} | {r['agreement']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="an exported run (runs/NAME with export/)")
    p.add_argument("--images", type=int, default=300, help="validation photos (default 300)")
    p.add_argument("--files", type=Path, nargs="*", default=[], help="other exported files of this run to compare "
                   "too (e.g. copies of an earlier export)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from cellcore.manifest import ManifestError

    missing = [f for f in args.files if not f.is_file()]
    if missing:
        log.error("no such file: %s", ", ".join(map(str, missing)))
        return 2
    try:
        result = measure(args.run_dir, args.images, args.files)
    except (ManifestError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    out = args.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(result, "python -m benchmarks.int8_fidelity " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "int8_fidelity.json").write_text(json.dumps(result, indent=1))
    (out / "int8_fidelity.md").write_text(md)
    log.info("wrote %s and %s\n%s", out / "int8_fidelity.md", out / "int8_fidelity.json", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
