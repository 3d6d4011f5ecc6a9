"""`python -m export.verify`: run real held-out images through PyTorch and every exported runtime; gate parity."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellcore.manifest import ManifestError, artifact_path, output_kind, read_manifest, sha256_of, write_manifest
from cellcore.panels import PANELS, PanelError, panel_label, resolve_panel
from cellcore.uncertainty import wilson
from export.runtimes import CoreMLRunner, ExecutorchRunner, OnnxRunner, RuntimeUnavailable, coreml_structure

log = logging.getLogger("export")

FP32_MAX_LOGIT_DIFF = 1e-3   # fp32 exports must match PyTorch this closely on every image
LOW_PRECISION_MAX_DROP = 1.0  # fp16/int8: at most this many accuracy points below PyTorch (target 0.5)
LOW_PRECISION_MAX_F1_DROP = 1.5      # ... and this many macro-F1 points
LOW_PRECISION_MAX_RECALL_DROP = 5.0  # ... and no class's recall more than this many points (a rare class
                                     # can collapse in int8 while the aggregate accuracy barely moves)
POINTS_EPS = 1e-9  # 3 of 300 images is 1.0 point, computed as 1.0000000000000009: a gate at 1.0 must let it pass


def low_precision_gate(ref_rep: dict, rep: dict) -> tuple[bool, str]:
    """Accuracy, macro-F1 and every class's recall against PyTorch's, on the same images."""
    drop = 100 * (ref_rep["accuracy"] - rep["accuracy"])
    f1_drop = 100 * (ref_rep["macro_f1"] - rep["macro_f1"])
    recall_drops = {c: 100 * (m["recall"] - rep["per_class"][c]["recall"])
                    for c, m in ref_rep["per_class"].items() if m["support"] > 0}
    worst = max(recall_drops, key=recall_drops.get) if recall_drops else None
    worst_drop = recall_drops.get(worst, 0.0) if worst else 0.0
    passed = (drop <= LOW_PRECISION_MAX_DROP + POINTS_EPS and f1_drop <= LOW_PRECISION_MAX_F1_DROP + POINTS_EPS
              and worst_drop <= LOW_PRECISION_MAX_RECALL_DROP + POINTS_EPS)
    return passed, (f"accuracy drop {drop:.2f} <= {LOW_PRECISION_MAX_DROP:g} pt, macro-F1 drop {f1_drop:.2f} <= "
                    f"{LOW_PRECISION_MAX_F1_DROP:g}, worst recall drop {worst_drop:.1f} ({worst}) <= "
                    f"{LOW_PRECISION_MAX_RECALL_DROP:g}")


@dataclass
class VerifyConfig:
    run_dir: str
    data: str = ""        # a labelled folder with the checkpoint's classes; default: the run's held-out split
    split: str = "auto"   # without data: auto (test when split.json has one, else val) | test | val
    limit: int = 0        # use only N images, spread over the set (0: all); for quick checks
    threads: int = 0      # onnxruntime intra-op threads (0: all cores)
    batch: int = 64       # images decoded and run at once: memory stays flat on any dataset size
    panel: str = ""       # the classes the lab's slides can show (cellcore.panels: wbc5, wbc6, or a class list)


def get_args_parser() -> argparse.ArgumentParser:
    d = VerifyConfig(run_dir="")
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--run-dir", required=True, help="runs/NAME holding best.pt, split.json and export/")
    p.add_argument("--data", default="", help="another labelled folder to measure on (its numbers are stored under "
                                               "its own name; the uncertainty rules are applied, not refitted)")
    p.add_argument("--split", default=d.split, choices=("auto", "test", "val"),
                   help="without --data: which part of split.json to report on (default auto: test if present; "
                        "the uncertainty rules are always fitted on val)")
    p.add_argument("--limit", type=int, default=0, help="use only N images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per decode/run batch (default {d.batch})")
    p.add_argument("--panel", default="", help="apply the rule on a panel, as the app does when a lab picks one: "
                   f"{', '.join(PANELS)} or a comma-separated class list (default: every class). Its tables are "
                   "written beside the others with the panel in their name; the rules are not refitted")
    return p


def _limited(samples, limit: int):
    if limit and len(samples.paths) > limit:
        step = max(1, len(samples.paths) // limit)
        samples.paths, samples.labels = samples.paths[::step][:limit], samples.labels[::step][:limit]
    return samples


def eval_samples(cfg: VerifyConfig, ckpt: dict, classes: list[str]):
    """-> (samples to report on, description naming the data, validation samples to fit the rules on or None)."""
    from train.data import held_out_part, load_split_samples, scan_onto_classes

    split = Path(cfg.run_dir) / "split.json"
    if cfg.data:
        samples = scan_onto_classes(cfg.data, classes, ckpt.get("class_map"))
        return _limited(samples, cfg.limit), str(cfg.data), None
    part, source = held_out_part(split)
    if cfg.split != "auto":
        part = cfg.split
        source = f"{split} {'test' if part == 'test' else 'validation'} split" + (
            "" if part == "test" else " (chose best.pt: selection-biased)")
    samples = _limited(load_split_samples(split, part), cfg.limit)
    val = samples if part == "val" else _limited(load_split_samples(split, "val"), cfg.limit)
    return samples, source, val


def stream_outputs(samples, prep, models: dict, checks, batch: int):
    """Decode `batch` images at a time with the app's decoder and run every model on them.

    -> ({name: [N, C] outputs}, labels [N], picture problems per image, skipped [(path, reason)]).
    Only [N, C] outputs are kept, so memory does not grow with the image size or the dataset.
    """
    from cellcore.imaging import BadImageError, decode

    outs: dict[str, list[np.ndarray]] = {k: [] for k in models}
    labels, problems, skipped = [], [], []
    for start in range(0, len(samples.paths), batch):
        xs = []
        for rel, label in zip(samples.paths[start:start + batch], samples.labels[start:start + batch]):
            path = Path(samples.root) / rel
            try:
                rgb = decode(path).rgb
            except BadImageError as exc:
                skipped.append((str(path), exc.reason))
                continue
            problems.append(checks.problems(rgb))  # on the photo as decoded, before any crop: as the app does
            xs.append(np.asarray(prep.apply(rgb), dtype=np.uint8))  # [S, S, 3] uint8
            labels.append(label)
        if not xs:
            continue
        x = np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2)).astype(np.float32) / 255.0  # [B, 3, S, S] 0..1
        for name, run in models.items():
            outs[name].append(run(x))
        log.info("verified %d/%d images", min(start + batch, len(samples.paths)), len(samples.paths))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return ({k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in outs.items()},
            np.asarray(labels, dtype=np.int64), problems, skipped)


def abstention(out: np.ndarray, y: np.ndarray, problems: list[list[str]], rule, kind: str) -> dict:
    """Share flagged under `rule` and the accuracy of what is not flagged (+ the share the feature distance flags;
    on a panel also the accuracy of the panel's answers and the share flagged for an off-panel first answer)."""
    probs, flagged = rule.flagged_outputs(out, problems, kind)
    dist = rule.distances(out)
    far = {} if dist is None else {"flagged_by_distance": float(np.mean([rule.far(d) for d in dist])) if len(y) else 0.0}
    on_panel = {} if rule.panel is None else {
        "accuracy_panel": float((probs.argmax(1) == y).mean()) if len(y) else None,
        "flagged_off_panel": float(np.mean(rule.off_panel(out))) if len(y) else 0.0}
    kept = ~flagged
    return {"flagged": float(flagged.mean()) if len(y) else 0.0, **far, **on_panel,
            "accuracy_unflagged": float((probs.argmax(1) == y)[kept].mean()) if kept.any() else None}


def near_tie(logits: np.ndarray, gap: float) -> np.ndarray:
    """[N, C] logits -> [N] bool: the top two are closer than `gap` (either may come first in another runtime)."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) < gap


def per_class_recall(rep: dict) -> dict:
    """{class: {recall, support, recall_ci95}}: what a model card and the app show per cell type."""
    return {c: {"recall": m["recall"], "support": m["support"],
                "recall_ci95": wilson(round(m["recall"] * m["support"]), m["support"])}
            for c, m in rep["per_class"].items()}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _runner(entry: dict, path: Path, classes: list[str], input_size: int, threads: int):
    """The runtime for one artifact; raises RuntimeUnavailable, or returns problems (Core ML structure)."""
    if entry["format"] == "onnx":
        return OnnxRunner(path, threads)
    if entry["format"] == "executorch":
        return ExecutorchRunner(path)
    if entry["format"] == "coreml":
        problems = coreml_structure(path, classes, input_size)
        return problems if problems else CoreMLRunner(path, classes)
    raise ManifestError(f"unknown format {entry['format']!r} in manifest")


def verify(cfg: VerifyConfig) -> tuple[list[dict], bool]:
    """Every artifact against PyTorch on the held-out images; writes verify.{json,md} and the manifest's record."""
    import torch

    from cellcore.quality import PictureChecks
    from cellcore.uncertainty import rule_for
    from export.cli import distance_record, uncertainty_record
    from train.distance import attach_from_export
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
    model, prep, classes = model_from_checkpoint(ckpt, ckpt_path, tta=manifest["model"].get("tta", "none"))
    if classes != manifest["classes"]:
        raise ManifestError(f"{export_dir}: manifest classes {manifest['classes']} differ from the checkpoint's")
    resolve_panel(cfg.panel, classes)  # a panel that does not fit is refused before any image is read
    attach_from_export(model, manifest, export_dir)  # the reference then outputs what the exported graphs output
    n = len(classes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    # Load every runtime once (images are streamed through all of them); rows for those that cannot run
    # here are decided now.
    models, rows_fixed, entries = {"best.pt": torch_run}, {}, {}
    for entry in manifest["artifacts"]:
        row = {"format": entry["format"], "precision": entry["precision"], "file": entry["file"],
               "size_mb": entry["size_bytes"] / 1e6, "accuracy": None, "macro_f1": None, "agreement": None,
               "max_abs_logit_diff": None, "ms_per_image": None, "gate": "", "note": ""}
        path = artifact_path(export_dir, entry)  # refuses a file whose sha256 differs from the manifest
        try:
            runner = _runner(entry, path, classes, prep.input_size, cfg.threads)
        except RuntimeUnavailable as exc:
            rows_fixed[entry["file"]] = {**row, "status": "structure ok", "note": f"numerics not measured: {exc}"}
            continue
        if isinstance(runner, list):  # Core ML spec problems
            rows_fixed[entry["file"]] = {**row, "status": "FAILED", "note": "; ".join(runner)}
            continue
        models[entry["file"]], entries[entry["file"]] = runner, entry

    samples, source, val = eval_samples(cfg, ckpt, classes)
    unc = manifest.setdefault("uncertainty", {})
    checks = PictureChecks.from_dict(unc.get("picture_checks"))
    keep = ("temperature", "threshold", "accuracy_at_or_above", "accuracy_ci95", "target_met", "coverage", "n",
            "accepted")
    if val is not None:
        # Each format gets its own temperature and threshold, fitted on the validation split (an int8
        # model's probabilities are not fp32's); what is reported below is measured on other images.
        val_out, val_y, _, _ = stream_outputs(val, prep, models, checks, cfg.batch)
        per = unc.setdefault("per_artifact", {})
        for name, out in val_out.items():
            kind = "logits" if name == "best.pt" else output_kind(entries[name])
            per[name] = {k: v for k, v in uncertainty_record(out[:, :n], val_y, unc.get("target_accuracy", 0.99),
                                                              kind).items() if k in keep}
            if unc.get("feature_distance"):  # each file's own threshold: an int8 graph's distances are not fp32's
                per[name].update(distance_record(out, n, unc["feature_distance"].get("quantile", 0.95)))
            per[name]["chosen_on"] = f"validation split ({len(val_y)} images)"
    log.info("verifying %d images from %s", len(samples.paths), source)
    times: dict[str, float] = {}

    def timed(name: str, run):
        def call(x: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            out = run(x)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return out
        return call

    outs, y, problems, skipped = stream_outputs(samples, prep, {k: timed(k, v) for k, v in models.items()},
                                                checks, cfg.batch)
    ref = outs["best.pt"]
    ms = lambda name: times.get(name, 0.0) * 1000 / max(1, len(y))  # noqa: E731
    ref_rep = report(y, ref[:, :n].argmax(1), classes)
    rows = [{"format": "pytorch", "precision": "fp32", "file": "best.pt", "status": "reference",
             "size_mb": (run_dir / "best.pt").stat().st_size / 1e6, "accuracy": ref_rep["accuracy"],
             "macro_f1": ref_rep["macro_f1"], "agreement": 1.0, "max_abs_logit_diff": 0.0,
             "ms_per_image": ms("best.pt"), "gate": "", "note": f"eager, batch {cfg.batch}",
             "per_class": per_class_recall(ref_rep),
             **abstention(ref, y, problems, rule_for(manifest, "best.pt", cfg.panel), "logits")}]
    ok = True
    for entry in manifest["artifacts"]:
        name = entry["file"]
        if name in rows_fixed:
            rows.append(rows_fixed[name])
            ok &= rows_fixed[name]["status"] != "FAILED"
            continue
        row = {"format": entry["format"], "precision": entry["precision"], "file": name,
               "size_mb": entry["size_bytes"] / 1e6, "max_abs_logit_diff": None, "note": ""}
        out, kind = outs[name], output_kind(entry)
        pred = out[:, :n].argmax(1)
        rep = report(y, pred, classes)
        agree = pred == ref[:, :n].argmax(1)
        row.update(accuracy=rep["accuracy"], macro_f1=rep["macro_f1"], agreement=float(agree.mean()),
                   ms_per_image=ms(name), per_class=per_class_recall(rep),
                   **abstention(out, y, problems, rule_for(manifest, name, cfg.panel), kind))
        if kind == "logits":
            row["max_abs_logit_diff"] = float(np.abs(out[:, :n] - ref[:, :n]).max())
            if out.shape[1] > n and ref.shape[1] > n:  # the feature distance: reported, gated through its own threshold
                row["max_abs_distance_diff"] = float(np.abs(out[:, n] - ref[:, n]).max())
        else:  # probabilities (Core ML): compare against PyTorch's softmax
            row["max_abs_prob_diff"] = float(np.abs(out - _softmax(ref[:, :n])).max())
        if entry["precision"] == "fp32":
            diff = row["max_abs_logit_diff"] if row["max_abs_logit_diff"] is not None else row["max_abs_prob_diff"]
            # a near-tie may flip: when every logit may move by the tolerance, a top-2 gap under twice it can swap
            flips = ~agree & ~near_tie(ref[:, :n], 2 * FP32_MAX_LOGIT_DIFF) if kind == "logits" else ~agree
            row["top1_flips_at_ties"] = int((~agree).sum() - flips.sum())
            passed = not flips.any() and diff <= FP32_MAX_LOGIT_DIFF
            row["gate"] = (f"agreement 100% (but at top-2 gaps < {2 * FP32_MAX_LOGIT_DIFF:g}) and max abs diff <= "
                           f"{FP32_MAX_LOGIT_DIFF:g}")
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
        if r.get("accuracy_panel") is not None:
            r["accuracy_panel_ci95"] = wilson(round(r["accuracy_panel"] * len(y)), len(y))
        per = (unc.get("per_artifact") or {}).get(r.get("file", ""), {})
        if per.get("target_met") is False and per.get("threshold") is not None:
            r["note"] = "; ".join(x for x in (r["note"], (
                f"threshold {per['threshold']:g} misses the {unc.get('target_accuracy', 0.99):.0%} target: accepted "
                f"validation answers {per['accuracy_at_or_above']:.2%} right")) if x)
    fingerprint = samples.fingerprint()
    result = {"source": source, "images": int(len(y)), "fingerprint": fingerprint, "classes": classes,
              "passed": bool(ok), "rows": rows, "per_class": ref_rep["per_class"], "panel": cfg.panel or "all",
              "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    stem = f"verify_{Path(cfg.data).name}" if cfg.data else "verify"  # the test split's tables stay put
    panel_tag = cfg.panel.replace(",", "+").replace(" ", "") if cfg.panel else ""
    stem += f"_panel_{panel_tag}" if panel_tag else ""
    (export_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows, source + (f"; panel {cfg.panel}: {panel_label(cfg.panel)}" if cfg.panel else ""),
                         len(y), panel=bool(cfg.panel))
    (export_dir / f"{stem}.md").write_text(table + "\n")
    # The app's About screen shows these numbers beside the data they come from. The run's own held-out
    # split is the canonical record; any other folder is kept under its own name and fingerprint.
    record = {r["file"]: {k: r.get(k) for k in ("format", "precision", "status", "accuracy", "accuracy_ci95",
                                                 "macro_f1", "agreement", "flagged", "flagged_by_distance",
                                                 "accuracy_unflagged", "accuracy_panel", "flagged_off_panel",
                                                 "per_class")}
              for r in rows}
    about = {"source": source, "images": int(len(y)), "fingerprint": fingerprint}
    if cfg.panel:  # a panel's numbers never replace the all-class record the app shows by default
        key = f"{Path(cfg.data).name if cfg.data else 'test split'}, panel {cfg.panel}"
        manifest["metrics"].setdefault("verify_other", {})[key] = {**about, "panel": cfg.panel, "results": record}
    elif cfg.data:
        manifest["metrics"].setdefault("verify_other", {})[Path(cfg.data).name] = {**about, "results": record}
    else:
        manifest["metrics"]["verify"] = record
        manifest["metrics"]["verify_source"] = {**about, "split": "test" if " test split" in source else "val"}
    write_manifest(manifest, export_dir)
    print(table)
    return rows, ok


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _ci(r: dict, key: str = "accuracy") -> str:
    if r.get(key) is None:
        return "–"
    lo, hi = r.get(f"{key}_ci95") or (None, None)
    return f"{r[key]:.4f}" + (f" ({lo:.3f}-{hi:.3f})" if lo is not None else "")


def format_table(rows: list[dict], source: str, n: int, panel: bool = False) -> str:
    lines = [f"Verification on {n} images ({source})", "",
             "| format | precision | status | size MB | accuracy (95% CI) | "
             + ("accuracy on the panel (95% CI) | " if panel else "") + "macro-F1 | agreement | max abs logit diff | "
             "flagged uncertain | accuracy of the rest | ms/image | gate | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if panel else "")]
    for r in rows:
        diff = r.get("max_abs_logit_diff")
        diff_s = _f(diff, ".2e") if diff is not None else (
            f"{r['max_abs_prob_diff']:.2e} (prob)" if r.get("max_abs_prob_diff") is not None else "–")
        lines.append(f"| {r['format']} | {r['precision']} | {r['status']} | {r['size_mb']:.2f} | "
                     f"{_ci(r)} | " + (f"{_ci(r, 'accuracy_panel')} | " if panel else "")
                     + f"{_f(r['macro_f1'], '.4f')} | {_f(r['agreement'], '.4f')} | "
                     f"{diff_s} | {_f(r.get('flagged'), '.1%')}"
                     + (f" ({r['flagged_by_distance']:.1%} by distance)" if r.get("flagged_by_distance") is not None else "")
                     + f" | {_f(r.get('accuracy_unflagged'), '.4f')} | "
                     f"{_f(r['ms_per_image'], '.2f')} | {r['gate']} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    cfg = VerifyConfig(run_dir=args.run_dir, data=args.data, split=args.split, limit=args.limit,
                       threads=args.threads, batch=args.batch, panel=args.panel)
    try:
        rows, ok = verify(cfg)
    except (ManifestError, CheckpointError, DatasetError, FileNotFoundError, PanelError) as exc:
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
