"""`python -m train.evaluate`: a checkpoint on any labelled folder (or its run's test split) -> metrics."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--checkpoint", help="a best.pt/last.pt (default: <run-dir>/best.pt)")
    p.add_argument("--run-dir", help="a training run folder")
    p.add_argument("--data", help="labelled folder or .zip with the checkpoint's classes "
                                  "(default: the run's held-out test split)")
    p.add_argument("--split", default="auto", choices=("auto", "test", "val"),
                   help="without --data: part of the run's split.json (default auto: test, or val for runs "
                        "made before the test split, which then says its numbers are selection-biased)")
    p.add_argument("--out", help="JSON report path (default: <run-dir>/eval/<data name>.json)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tta", default="none", choices=("none", "dihedral8"),
                   help="test-time augmentation, as export --tta puts in the exported graph (default none)")
    p.add_argument("--save-logits", help="also write the logits and labels to this .npz (for calibration studies)")
    return p


def evaluate(checkpoint: Path, data: str | None, run_dir: Path | None, batch_size: int = 128,
             save_logits: Path | None = None, split: str = "auto", tta: str = "none") -> dict:
    import torch

    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import DatasetError, ImageCache, held_out_part, load_split_samples, scan_onto_classes
    from train.engine import predict_logits, to_tensor_nchw
    from train.metrics import report

    ckpt = load_checkpoint(checkpoint)
    model, prep, classes = model_from_checkpoint(ckpt, checkpoint, tta=tta)
    if data:
        samples = scan_onto_classes(data, classes, ckpt.get("class_map"))
        source = str(data)
    else:
        if run_dir is None:
            raise DatasetError("give --data, or --run-dir whose split.json holds the held-out images")
        part, source = held_out_part(run_dir / "split.json")  # test; val (and says so) for older runs
        if split != "auto":
            part, source = split, f"{run_dir / 'split.json'} {'test' if split == 'test' else 'validation'} split"
        samples = load_split_samples(run_dir / "split.json", part)
    cache = ImageCache.build(samples, prep)
    logits = predict_logits(model, to_tensor_nchw(cache.images), torch.device("cpu"), batch=batch_size)
    rep = report(cache.labels, logits.argmax(1).numpy(), classes)
    if save_logits is not None:
        import numpy as np

        save_logits.parent.mkdir(parents=True, exist_ok=True)
        np.savez(save_logits, logits=logits.numpy(), labels=cache.labels, classes=np.asarray(classes),
                 paths=np.asarray(cache.paths))
    rep.update(source=source, checkpoint=str(checkpoint), arch=ckpt["arch"], epoch=ckpt.get("epoch"), tta=tta,
               skipped=[{"path": p, "reason": r} for p, r in cache.skipped])
    return rep


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError
    from train.engine import setup_logging
    from train.metrics import format_report

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    run_dir = Path(args.run_dir) if args.run_dir else None
    ckpt = Path(args.checkpoint) if args.checkpoint else (run_dir / "best.pt" if run_dir else None)
    if ckpt is None:
        log.error("give --checkpoint or --run-dir")
        return 2
    try:
        rep = evaluate(ckpt, args.data, run_dir, args.batch_size,
                       Path(args.save_logits) if args.save_logits else None, args.split, args.tta)
    except (CheckpointError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    name = Path(args.data).name if args.data else ("test" if " test split" in rep["source"] else "val")
    name += "" if args.tta == "none" else f"_tta_{args.tta}"
    out = Path(args.out) if args.out else ckpt.parent / "eval" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2))
    print(f"{rep['arch']} epoch {rep['epoch']} on {rep['source']}\n{format_report(rep)}\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
