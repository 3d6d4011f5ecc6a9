"""`python -m export`: a trained run's best.pt -> every phone format + manifest.json, staged and logged."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellcore.manifest import NOTICE, SCHEMA_VERSION, ManifestError, sha256_of, size_of, write_manifest

log = logging.getLogger("export")

ALL_FORMATS = ("onnx_fp32", "onnx_int8", "xnnpack_fp32", "xnnpack_int8", "coreml_fp16", "coreml_fp32")


@dataclass
class ExportConfig:
    run_dir: str = "runs/default"
    formats: list[str] = field(default_factory=lambda: list(ALL_FORMATS))
    calib_images: int = 256          # training images for int8 calibration (spread over classes)
    target_accuracy: float = 0.99    # the uncertainty threshold keeps accepted predictions at least this accurate
    data: str = ""                   # override the dataset root recorded in split.json (data moved)
    version: str = ""                # model version string for the manifest/app (default: run name + epoch)
    # classes that are not a white cell (PBC: platelet, a field without one): always flagged by the app
    not_a_white_cell: list[str] = field(default_factory=list)
    # test-time augmentation folded into every exported graph (train.models.TTA_MODES); the manifest records it
    tta: str = "none"
    # flag photos whose nucleus colour lies outside the training photos' (cellcore.quality.PictureChecks.stain_hue)
    stain_check: bool = True
    # the range is the training photos' 0.1st..99.9th percentile widened by this fraction of its span on each side
    stain_margin: float = 0.1
    # append the feature distance (train.distance) to every graph but Core ML's; flag above this validation quantile
    feature_distance: bool = True
    distance_quantile: float = 0.95


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export runs/<name>/best.pt for phones.")
    p.add_argument("--run-dir", required=True, help="the training run folder (holds best.pt and split.json)")
    p.add_argument("--formats", nargs="+", default=list(ALL_FORMATS), metavar="FMT",
                   help=f"subset of: {', '.join(ALL_FORMATS)} (default: all)")
    p.add_argument("--calib-images", type=int, default=256,
                   help="training images that calibrate the int8 files (default 256). onnxruntime's calibrator holds "
                        "every activation of every image in memory: 1,024 with --tta dihedral8 went past 24 GB")
    p.add_argument("--target-accuracy", type=float, default=0.99)
    p.add_argument("--data", default="", help="dataset root, if it moved since training")
    p.add_argument("--version", default="")
    p.add_argument("--not-a-white-cell", nargs="*", default=[], metavar="CLASS",
                   help="classes that are not a white cell (e.g. platelet): their answers are always flagged")
    p.add_argument("--tta", default="none", choices=("none", "dihedral8"),
                   help="test-time augmentation inside the exported graph: dihedral8 averages the logits of the 8 "
                        "rotations/mirrors (8x the compute; measured in the README on other labs' cells)")
    p.add_argument("--no-stain-check", dest="stain_check", action="store_false",
                   help="do not flag photos whose nucleus colour lies outside the training photos' range (default: "
                        "flag them; the model is confidently wrong on other labs' stains, README 'Cells from other labs')")
    p.add_argument("--stain-margin", type=float, default=0.1,
                   help="widen the fitted stain colour range by this fraction of its span on each side (default 0.1; "
                        "larger flags fewer photos of stains near the training stain)")
    p.add_argument("--no-feature-distance", dest="feature_distance", action="store_false",
                   help="do not append the feature distance to the exported graphs (default: append it; answers whose "
                        "features lie far from every training class are flagged, README 'Cells from other labs')")
    p.add_argument("--distance-quantile", type=float, default=0.95,
                   help="flag distances above this quantile of the validation split's (default 0.95: 5%% of "
                        "validation cells exceed it; each exported file gets its own threshold in verify)")
    return p


def distance_record(val_out: np.ndarray, n_classes: int, quantile: float) -> dict:
    """{"max_distance": ...} from a model's [N, C + 1] validation outputs; {} when it has no distance column."""
    if val_out.ndim != 2 or val_out.shape[1] <= n_classes:
        return {}
    return {"max_distance": round(float(np.quantile(val_out[:, n_classes].astype(np.float64), quantile)), 5)}


def uncertainty_record(val_logits: np.ndarray, labels: np.ndarray, target: float, kind: str = "logits",
                       checks: "PictureChecks | None" = None) -> dict:
    """Temperature and threshold for one model's validation outputs (cellcore.uncertainty's rule)."""
    from cellcore.quality import PictureChecks
    from cellcore.uncertainty import UncertaintyRule, choose_threshold, fit_temperature

    logits = np.log(np.clip(val_logits, 1e-12, 1.0)) if kind == "probabilities" else val_logits
    t = fit_temperature(logits, labels)
    chosen = choose_threshold(UncertaintyRule(t).probabilities(logits), labels, target)
    if chosen["threshold"] is None:
        log.warning("no threshold keeps a right prediction on the validation images: every prediction of this model "
                    "will be marked uncertain (threshold null)")
    elif not chosen["target_met"]:
        log.warning("no threshold reaches %.0f%% accuracy on the %d validation images: using %.3f, where the %d "
                    "accepted predictions are %.2f%% right (the highest lower 95%% bound); pass --target-accuracy "
                    "to choose another target", 100 * target, chosen["n"], chosen["threshold"], chosen["accepted"],
                    100 * chosen["accuracy_at_or_above"])
    return {"temperature": round(t, 4), **chosen, "target_accuracy": target, "chosen_on": "validation split",
            "picture_checks": (checks or PictureChecks()).to_dict(),
            "rule": "uncertain if the picture checks fail, or max softmax(logits / temperature) < threshold "
                    "(the smallest at which accepted validation predictions reach target_accuracy; target_met "
                    "false: none did, and this one has the most certainly accurate accepted predictions; "
                    "threshold null: always uncertain)"}


class ExportFailed(RuntimeError):
    """No format could be exported; the previous export is left as it was."""


def _recover(out_dir: Path) -> None:
    """An export killed between its two renames left the previous folder as .export-old: put it back."""
    old = out_dir.parent / ".export-old"
    if old.is_dir() and not out_dir.exists():
        old.rename(out_dir)
        log.warning("restored the previous export from %s (an earlier export was interrupted)", old)


def _calibration_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """An even spread over the training set, class by class (labels are sorted by class in the split)."""
    if n >= len(labels):
        return np.arange(len(labels))
    return np.linspace(0, len(labels) - 1, n).round().astype(int)


def source_revision() -> dict:
    """The git commit this export's code came from (and whether the tree had uncommitted changes): the
    manifest says which code made a model, so `make release-model` can be rerun from that commit."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "dirty": None}
    return {"git_commit": commit, "dirty": dirty}


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm", "onnx", "onnxruntime", "onnxscript", "executorch", "coremltools", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_export(cfg: ExportConfig) -> Path:
    import torch

    from cellcore.quality import PictureChecks, stain_hue_range
    from export.exporters import EXPORTERS, ExportContext, with_distance_column
    from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from train.data import ImageCache, load_split_samples
    from train.engine import predict_logits, to_tensor_nchw
    from train.models import count_params

    if cfg.stain_margin < 0:
        raise ValueError(f"--stain-margin {cfg.stain_margin}: must be >= 0 (a fraction of the fitted range's span)")
    if not 0 < cfg.distance_quantile < 1:
        raise ValueError(f"--distance-quantile {cfg.distance_quantile}: must lie strictly between 0 and 1")
    unknown = [f for f in cfg.formats if f not in EXPORTERS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; valid: {', '.join(EXPORTERS)}")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir} (train first: make train RUN=<name>)")
    ckpt_path = run_dir / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    cfg_arch = ckpt.get("config", {}).get("arch", ckpt["arch"])
    if cfg_arch != ckpt["arch"]:
        raise CheckpointError(f"{ckpt_path}: checkpoint says arch {ckpt['arch']!r} but its config says {cfg_arch!r}")
    model, prep, classes = model_from_checkpoint(ckpt, ckpt_path, tta=cfg.tta)
    arch = ckpt["arch"]
    log.info("[1/5] loaded %s: %s, %d classes, %d px, epoch %d, test-time augmentation %s", ckpt_path, arch,
             len(classes), prep.input_size, ckpt["epoch"], cfg.tta)

    split = run_dir / "split.json"
    train_s = load_split_samples(split, "train", cfg.data or None)
    val_s = load_split_samples(split, "val", cfg.data or None)
    if train_s.classes != classes:
        raise CheckpointError(f"{split}: classes {train_s.classes} differ from the checkpoint's {classes}")
    idx = _calibration_indices(np.asarray(train_s.labels), cfg.calib_images)
    calib_s = dataclasses.replace(train_s, paths=[train_s.paths[i] for i in idx], labels=[train_s.labels[i] for i in idx])
    calib = ImageCache.build(calib_s, prep)
    calib_x = to_tensor_nchw(calib.images).float().div(255).contiguous().numpy()  # [N, 3, S, S] float32 0..1
    val = ImageCache.build(val_s, prep)
    log.info("[2/5] %d calibration images (training split), %d validation images", len(calib), len(val))

    distance = None
    if cfg.feature_distance:
        from train.distance import fit_on_images

        train_c = ImageCache.build(train_s, prep)
        distance = fit_on_images(model, train_c.images, train_c.labels)
        model.distance = distance  # every graph below (Core ML aside) outputs [B, C + 1]: logits, then the distance
        log.info("      feature distance fitted on %d training images", len(train_c))
    with torch.no_grad():
        val_out = predict_logits(model, to_tensor_nchw(val.images), torch.device("cpu")).numpy()
    val_logits = torch.from_numpy(val_out[:, :len(classes)])
    hue = None
    if cfg.stain_check:
        # a fine-tuned run carries its parent's range widened by the new lab's cells; else fit it on the training split
        hue = ckpt.get("stain_hue") or stain_hue_range([Path(train_s.root) / p for p in train_s.paths],
                                                       margin=cfg.stain_margin)
    unc = uncertainty_record(val_logits.numpy(), val.labels, cfg.target_accuracy, checks=PictureChecks(stain_hue=hue))
    unknown_cls = [c for c in cfg.not_a_white_cell if c not in classes]
    if unknown_cls:
        raise ValueError(f"--not-a-white-cell {unknown_cls}: not classes of this model; valid: {', '.join(classes)}")
    unc["not_a_white_cell"] = list(cfg.not_a_white_cell)
    if distance is not None:
        from train.distance import FILE

        unc["feature_distance"] = {
            "file": FILE, "column": len(classes), "quantile": cfg.distance_quantile,
            **distance_record(val_out, len(classes), cfg.distance_quantile),
            "fitted_on": f"training split ({len(train_c)} images)",
            "rule": "uncertain if the output's column `column` (the smallest Mahalanobis distance of the features "
                    "to a training class mean, per dimension) exceeds max_distance, this file's "
                    f"{cfg.distance_quantile} quantile of the validation split's"}
    log.info("[3/5] temperature %.2f, uncertainty threshold %s (PyTorch; each format gets its own in verify)",
             unc["temperature"], unc["threshold"])

    out_dir = run_dir / "export"
    stage = run_dir / ".export-staging"
    _recover(out_dir)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    if distance is not None:
        distance.save(stage / unc["feature_distance"]["file"])
        unc["feature_distance"]["sha256"] = sha256_of(stage / unc["feature_distance"]["file"])
    version = cfg.version or f"{run_dir.name}-e{ckpt['epoch']}"
    metadata = {"arch": arch, "classes": ",".join(classes), "version": version, "input_size": str(prep.input_size),
                "preprocessing": prep.resize, "notice": NOTICE}
    ctx = ExportContext(model=model, arch=arch, classes=classes, input_size=prep.input_size, calib=calib_x,
                        out_dir=stage, metadata=metadata)
    entries, failed = [], []
    for i, name in enumerate(cfg.formats, 1):
        log.info("[4/5] (%d/%d) exporting %s ...", i, len(cfg.formats), name)
        try:
            entries.append(with_distance_column(EXPORTERS[name](ctx), model, len(classes)))
        except Exception as exc:  # noqa: BLE001 - any exporter's failure (coremltools, torch.export, ...) is
            # that format's alone: recorded with its reason, the other formats are still written and verified
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.error("%s FAILED, the other formats go on: %s", name, reason)
            failed.append({"format": name, "status": "failed", "reason": reason})
    if not entries:
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportFailed(f"every format failed ({'; '.join(f['format'] + ': ' + f['reason'] for f in failed)}); "
                           f"the previous export in {out_dir} is untouched")
    for e in entries:
        p = stage / e["file"]
        e["size_bytes"], e["sha256"] = size_of(p), sha256_of(p)
        log.info("      %-40s %8.2f MB  sha256 %s", e["file"], e["size_bytes"] / 1e6, e["sha256"][:12])

    s = prep.input_size
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "version": version,
        "model": {"arch": arch, "params": count_params(model), "epoch": ckpt["epoch"], "run_dir": str(run_dir),
                  "checkpoint": ckpt_path.name, "checkpoint_sha256": sha256_of(ckpt_path), "tta": cfg.tta},
        "classes": classes,
        "input": {"name": "image", "shape": [1, 3, s, s], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB", "value_range": [0.0, 1.0]},
        "preprocessing": {**prep.to_dict(), "app_steps": [
            "decode the photo to 8-bit RGB (drop alpha, expand grayscale, 16-bit >> 8)",
            ("crop the largest centred square: side = min(w, h), left = (w - side) // 2, top = (h - side) // 2"
             if prep.resize == "center_square_crop_then_resize" else
             f"crop the square around the nucleus nearest the centre (cellcore.preprocess.cell_box, nucleus spans "
             f"{prep.cell_fill} of the side, the side at least {prep.cell_min_side} and at most {prep.cell_max_side} of the photo's short side; edge pixels "
             f"repeated past the photo's border)"),
            f"resize that square to {s} x {s} with Pillow's bilinear filter (Image.resize(..., box=square))",
            "convert to float32 and divide by 255 (values 0..1); do NOT subtract mean or divide by std "
            "(the model does it)",
            f"lay out as NCHW [1, 3, {s}, {s}], RGB order",
        ]},
        "output": {"name": "logits", "shape": [1, len(classes) + (distance is not None)],
                   "meaning": "unnormalised class scores in the order of 'classes'; softmax gives probabilities"
                              + ("; already the mean over the 8 rotations/mirrors of the input (model.tta), so the app "
                                 "runs the model once" if cfg.tta != "none" else "")
                              + ("; then one more column, the feature distance (uncertainty.feature_distance; Core ML "
                                 "files have none)" if distance is not None else "")},
        "uncertainty": unc,
        "metrics": {"training": {k: v for k, v in ckpt.get("metrics", {}).items() if k != "report"}, "verify": {}},
        "dataset": {"name": Path(str(ckpt.get("config", {}).get("data", ""))).name,
                    "fingerprint": ckpt.get("dataset_fingerprint"), "train_counts": train_s.counts(),
                    "val_counts": val_s.counts(), "class_map": ckpt.get("class_map")},
        "artifacts": entries,
        "tools": tool_versions(),
        "source": source_revision(),
        "notice": NOTICE,
    }
    manifest["failed_formats"] = failed
    # The whole folder is built aside (artifacts + manifest), then swapped in: the previous export stays
    # whole until the new one is complete, and a crash between the two renames is undone by _recover.
    path = write_manifest(manifest, stage)
    old = run_dir / ".export-old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    stage.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    path = out_dir / path.name
    log.info("[5/5] wrote %s with %d artifacts", path, len(entries))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    cfg = ExportConfig(run_dir=args.run_dir, formats=args.formats, calib_images=args.calib_images,
                       target_accuracy=args.target_accuracy, data=args.data, version=args.version,
                       not_a_white_cell=args.not_a_white_cell, tta=args.tta, stain_check=args.stain_check,
                       stain_margin=args.stain_margin, feature_distance=args.feature_distance,
                       distance_quantile=args.distance_quantile)
    try:
        run_export(cfg)
    except (CheckpointError, DatasetError, ManifestError, FileNotFoundError, ValueError, ExportFailed) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
