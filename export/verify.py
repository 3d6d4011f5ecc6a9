"""`python -m export.verify`: run real validation images through PyTorch and every exported runtime; gate parity."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.manifest import ManifestError, artifact_path, read_manifest, sha256_of, write_manifest
from export.runtimes import CoreMLRunner, ExecutorchRunner, OnnxRunner, RuntimeUnavailable, coreml_structure

log = logging.getLogger("export")

FP32_MAX_LOGIT_DIFF = 1e-3   # fp32 exports must match PyTorch this closely on every image
LOW_PRECISION_MAX_DROP = 1.0  # fp16/int8: at most this many accuracy points below PyTorch (target 0.5)
LOW_PRECISION_MAX_F1_DROP = 1.5      # ... and this many macro-F1 points
LOW_PRECISION_MAX_RECALL_DROP = 5.0  # ... and no class's recall more than this many points (a rare class
                                     # can collapse in int8 while the aggregate accuracy barely moves)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small n and for k near 0 or n)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def low_precision_gate(ref_rep: dict, rep: dict) -> tuple[bool, str]:
    """Accuracy, macro-F1 and every class's recall against PyTorch's, on the same images."""
    drop = 100 * (ref_rep["accuracy"] - rep["accuracy"])
    f1_drop = 100 * (ref_rep["macro_f1"] - rep["macro_f1"])
    recall_drops = {c: 100 * (m["recall"] - rep["per_class"][c]["recall"])
                    for c, m in ref_rep["per_class"].items() if m["support"] > 0}
    worst = max(recall_drops, key=recall_drops.get) if recall_drops else None
    worst_drop = recall_drops.get(worst, 0.0) if worst else 0.0
    passed = (drop <= LOW_PRECISION_MAX_DROP and f1_drop <= LOW_PRECISION_MAX_F1_DROP
              and worst_drop <= LOW_PRECISION_MAX_RECALL_DROP)
    return passed, (f"accuracy drop {drop:.2f} <= {LOW_PRECISION_MAX_DROP:g} pt, macro-F1 drop {f1_drop:.2f} <= "
                    f"{LOW_PRECISION_MAX_F1_DROP:g}, worst recall drop {worst_drop:.1f} ({worst}) <= "
                    f"{LOW_PRECISION_MAX_RECALL_DROP:g}")


@dataclass
class VerifyConfig:
    run_dir: str
    data: str = ""        # a labelled folder with the checkpoint's classes; default: the run's validation split
    limit: int = 0        # use only the first N images (0: all); for quick checks
    threads: int = 0      # onnxruntime intra-op threads (0: all cores)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", default="", help="labelled folder (default: the run's saved validation split)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p


def load_images(cfg: VerifyConfig, ckpt: dict, classes: list[str]):
    """-> (x [N, 3, S, S] float32 0..1, labels [N], source description). Decoded as the app decodes."""
    from train.data import ImageCache, load_split_samples, scan_onto_classes
    from train.preprocess import Preprocessing

    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    if cfg.data:
        samples = scan_onto_classes(cfg.data, classes, ckpt.get("class_map"))
        source = str(cfg.data)
    else:
        samples = load_split_samples(Path(cfg.run_dir) / "split.json", "val")
        source = f"{cfg.run_dir}/split.json (validation split)"
    if cfg.limit:
        step = max(1, len(samples.paths) // cfg.limit)
        samples.paths, samples.labels = samples.paths[::step][:cfg.limit], samples.labels[::step][:cfg.limit]
    cache = ImageCache.build(samples, prep)
    x = np.ascontiguousarray(cache.images.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    return x, cache.labels, source, [str(Path(samples.root) / p) for p in cache.paths]


def picture_problems(paths: list[str], checks) -> list[list[str]]:
    """cellcore.quality's checks on each photo as decoded (before any crop): what the app checks."""
    from train.data import load_rgb

    return [checks.problems(load_rgb(p)) for p in paths]


def abstention(out: np.ndarray, y: np.ndarray, problems: list[list[str]], rule, kind: str) -> dict:
    """Share flagged under `rule` and the accuracy of what is not flagged."""
    probs = rule.probabilities(out, kind)
    flagged = np.array([rule.uncertain(float(p.max()), pr) for p, pr in zip(probs, problems)])
    kept = ~flagged
    return {"flagged": float(flagged.mean()) if len(y) else 0.0,
            "accuracy_unflagged": float((probs.argmax(1) == y)[kept].mean()) if kept.any() else None}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def verify(cfg: VerifyConfig) -> tuple[list[dict], bool]:
    import torch

    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.metrics import report

    run_dir = Path(cfg.run_dir)
    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    ckpt_path = run_dir / manifest["model"]["checkpoint"]
    recorded = manifest["model"].get("checkpoint_sha256")
    if recorded and ckpt_path.exists() and sha256_of(ckpt_path) != recorded:
        raise ManifestError(f"{ckpt_path} is not the checkpoint {export_dir} was exported from (sha256 "
                            f"{sha256_of(ckpt_path)[:12]}… instead of {recorded[:12]}…): it was trained further or "
                            f"replaced. Export again (make export RUN={run_dir.name}) before verifying.")
    ckpt = load_checkpoint(ckpt_path)
    model, prep, classes = model_from_checkpoint(ckpt)
    if classes != manifest["classes"]:
        raise ManifestError(f"{export_dir}: manifest classes {manifest['classes']} differ from the checkpoint's")
    from cellcore.quality import PictureChecks
    from cellcore.uncertainty import rule_for
    from export.cli import uncertainty_record

    x, y, source, paths = load_images(cfg, ckpt, classes)
    unc = manifest.setdefault("uncertainty", {})
    problems = picture_problems(paths, PictureChecks.from_dict(unc.get("picture_checks")))
    # On the validation split each format gets its own temperature and threshold (an int8 model's
    # probabilities are not fp32's); on any other folder the recorded rules are applied, not refitted.
    fit = not cfg.data
    per = unc.setdefault("per_artifact", {}) if fit else unc.get("per_artifact", {})
    keep = ("temperature", "threshold", "accuracy_at_or_above", "coverage", "n", "accepted")

    def fitted(out: np.ndarray, kind: str = "logits") -> dict:
        return {k: v for k, v in uncertainty_record(out, y, unc.get("target_accuracy", 0.99), kind).items() if k in keep}
    log.info("verifying %d images from %s", len(x), source)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    t0 = time.perf_counter()
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()
    torch_ms = (time.perf_counter() - t0) * 1000 / len(x)
    ref_rep = report(y, ref.argmax(1), classes)
    if fit:
        per["best.pt"] = fitted(ref)
    rows = [{"format": "pytorch", "precision": "fp32", "file": "best.pt", "status": "reference",
             "size_mb": (run_dir / "best.pt").stat().st_size / 1e6, "accuracy": ref_rep["accuracy"],
             "macro_f1": ref_rep["macro_f1"], "agreement": 1.0, "max_abs_logit_diff": 0.0, "ms_per_image": torch_ms,
             "gate": "", "note": "eager, batch 64",
             **abstention(ref, y, problems, rule_for(manifest, "best.pt"), "logits")}]
    ok = True
    for entry in manifest["artifacts"]:
        path = artifact_path(export_dir, entry)  # refuses a file whose sha256 differs from the manifest
        row = {"format": entry["format"], "precision": entry["precision"], "file": entry["file"],
               "size_mb": entry["size_bytes"] / 1e6, "accuracy": None, "macro_f1": None, "agreement": None,
               "max_abs_logit_diff": None, "ms_per_image": None, "gate": "", "note": ""}
        try:
            if entry["format"] == "onnx":
                runner = OnnxRunner(path, cfg.threads)
            elif entry["format"] == "executorch":
                runner = ExecutorchRunner(path)
            elif entry["format"] == "coreml":
                problems = coreml_structure(path, classes, prep.input_size)
                if problems:
                    row.update(status="FAILED", note="; ".join(problems))
                    ok = False
                    rows.append(row)
                    continue
                runner = CoreMLRunner(path, classes)
            else:
                raise ManifestError(f"unknown format {entry['format']!r} in manifest")
        except RuntimeUnavailable as exc:
            row.update(status="structure ok", note=f"numerics not measured: {exc}")
            rows.append(row)
            continue
        t0 = time.perf_counter()
        out = runner(x)
        row["ms_per_image"] = (time.perf_counter() - t0) * 1000 / len(x)
        pred = out.argmax(1)
        rep = report(y, pred, classes)
        row.update(accuracy=rep["accuracy"], macro_f1=rep["macro_f1"], agreement=float((pred == ref.argmax(1)).mean()))
        kind = entry.get("output_kind", "logits")
        if fit:
            per[entry["file"]] = fitted(out, kind)
        row.update(abstention(out, y, problems, rule_for(manifest, entry["file"]), kind))
        if entry.get("output_kind", "logits") == "logits":
            row["max_abs_logit_diff"] = float(np.abs(out - ref).max())
        else:  # probabilities (Core ML): compare against PyTorch's softmax
            row["max_abs_prob_diff"] = float(np.abs(out - _softmax(ref)).max())
        if entry["precision"] == "fp32":
            diff = row["max_abs_logit_diff"] if row["max_abs_logit_diff"] is not None else row["max_abs_prob_diff"]
            passed = row["agreement"] == 1.0 and diff <= FP32_MAX_LOGIT_DIFF
            row["gate"] = f"agreement 100% and max abs diff <= {FP32_MAX_LOGIT_DIFF:g}"
        else:
            passed, row["gate"] = low_precision_gate(ref_rep, rep)
        row["status"] = "PASS" if passed else "FAILED"
        ok &= passed
        rows.append(row)

    for f in manifest.get("failed_formats", []):  # export could not write it: verification fails, naming why
        rows.append({"format": f["format"], "precision": "", "file": f["format"], "status": "FAILED", "size_mb": 0.0,
                     "accuracy": None, "macro_f1": None, "agreement": None, "max_abs_logit_diff": None,
                     "ms_per_image": None, "gate": "exported", "note": f"export failed: {f['reason']}"})
        ok = False
    for r in rows:  # every accuracy on a few hundred images gets its 95% interval
        if r["accuracy"] is not None:
            r["accuracy_ci95"] = wilson(round(r["accuracy"] * len(y)), len(y))
    result = {"source": source, "images": int(len(x)), "classes": classes, "passed": bool(ok), "rows": rows}
    (export_dir / "verify.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows, source, len(x))
    (export_dir / "verify.md").write_text(table + "\n")
    # The app's About screen shows these numbers: record them in the manifest (artifacts unchanged). The
    # run's own held-out split is the canonical record; any other folder is kept under its own name.
    record = {r["file"]: {k: r.get(k) for k in ("format", "precision", "status", "accuracy", "macro_f1", "agreement",
                                                 "flagged", "accuracy_unflagged")} for r in rows}
    if fit:
        manifest["metrics"]["verify"] = record
        manifest["metrics"]["verify_source"] = {"source": source, "images": int(len(x))}
    else:
        manifest["metrics"].setdefault("verify_other", {})[Path(cfg.data).name] = {
            "source": source, "images": int(len(x)), "results": record}
    write_manifest(manifest, export_dir)
    print(table)
    return rows, ok


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _ci(r: dict) -> str:
    if r["accuracy"] is None:
        return "–"
    lo, hi = r.get("accuracy_ci95") or (None, None)
    return f"{r['accuracy']:.4f}" + (f" ({lo:.3f}-{hi:.3f})" if lo is not None else "")


def format_table(rows: list[dict], source: str, n: int) -> str:
    lines = [f"Verification on {n} images ({source})", "",
             "| format | precision | status | size MB | accuracy (95% CI) | macro-F1 | agreement | max abs logit diff | "
             "flagged uncertain | accuracy of the rest | ms/image | gate | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("max_abs_logit_diff")
        diff_s = _f(diff, ".2e") if diff is not None else (
            f"{r['max_abs_prob_diff']:.2e} (prob)" if r.get("max_abs_prob_diff") is not None else "–")
        lines.append(f"| {r['format']} | {r['precision']} | {r['status']} | {r['size_mb']:.2f} | "
                     f"{_ci(r)} | {_f(r['macro_f1'], '.4f')} | {_f(r['agreement'], '.4f')} | "
                     f"{diff_s} | {_f(r.get('flagged'), '.1%')} | {_f(r.get('accuracy_unflagged'), '.4f')} | "
                     f"{_f(r['ms_per_image'], '.2f')} | {r['gate']} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    cfg = VerifyConfig(run_dir=args.run_dir, data=args.data, limit=args.limit, threads=args.threads)
    try:
        rows, ok = verify(cfg)
    except (ManifestError, CheckpointError, DatasetError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    if not ok:
        failed = [f"{r['file']} ({r['note'] or r['gate']})" for r in rows if r["status"] == "FAILED"]
        log.error("verification FAILED for: %s", ", ".join(failed))
        return 1
    log.info("all gates passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
