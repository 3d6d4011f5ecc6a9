"""Compare candidate `cpu` presets at equal wall-clock budgets on real data (how the preset was chosen).

python -m benchmarks.tune_cpu_preset --data ../shared/data/pbc_dev \
    --candidate "xxs96:--arch mobilevit_xxs --image-size 96 --epochs 20" \
    --candidate "xxs128:--arch mobilevit_xxs --image-size 128 --epochs 11"

Each candidate is a full `python -m train --preset cpu` run with overrides; the table (time,
best val accuracy, macro-F1) goes to runs/bench/tune_cpu.md and .json.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--candidate", action="append", required=True, help="NAME:train flags")
    p.add_argument("--out", default="runs/bench")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "tune_cpu.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for cand in args.candidate:
        name, _, flags = cand.partition(":")
        run_dir = out / f"tune_{name}"
        cmd = [sys.executable, "-m", "train", "--data", args.data, "--run-dir", str(run_dir), "--preset", "cpu",
               *shlex.split(flags)]
        log.info("%s: %s", name, " ".join(cmd))
        t0 = time.time()
        rc = subprocess.call(cmd)
        wall = time.time() - t0
        if rc != 0:
            log.error("%s failed (exit %d)", name, rc)
            return rc
        import csv

        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        best = max(rows, key=lambda r: float(r["val_macro_f1"]))
        results[name] = {"flags": flags, "wall_s": round(wall, 1), "epochs": len(rows),
                         "best_epoch": int(best["epoch"]), "val_acc": float(best["val_acc"]),
                         "val_macro_f1": float(best["val_macro_f1"]),
                         "final_val_acc": float(rows[-1]["val_acc"]),
                         "images_per_s": float(rows[-1]["train_images_per_s"])}
        results_path.write_text(json.dumps(results, indent=1))
    lines = [f"# cpu preset candidates ({platform.processor() or platform.machine()}, "
             f"{__import__('os').cpu_count()} cores)", "",
             "| candidate | flags | wall min | epochs | best val acc | macro-F1 | final val acc | train img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | `{r['flags']}` | {r['wall_s'] / 60:.1f} | {r['epochs']} | {r['val_acc']:.4f} | "
                     f"{r['val_macro_f1']:.4f} | {r['final_val_acc']:.4f} | {r['images_per_s']:.0f} |")
    (out / "tune_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
