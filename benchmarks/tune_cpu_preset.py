"""Compare candidate training recipes on real data, in-domain and cross-lab (how the presets were chosen).

python -m benchmarks.tune_cpu_preset --data ../shared/data/pbc_dev \
    --eval-data ../shared/data/crosslab_dev \
    --candidate "base:--augment dihedral" \
    --candidate "robust_od:--augment robust --input-norm od_instance"

Each candidate is a full `python -m train --preset cpu` run with overrides (`--base-preset` picks
another preset, `--parallel N` runs N at once, which pays on a GPU). After training, the best
checkpoint is evaluated on every `--eval-data` folder (other labs' labelled cells: never trained
on). The table (time, best val accuracy and macro-F1, accuracy on each eval folder) goes to
<out>/<name>.md and .json; results of earlier calls with the same --name are kept.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training folder (split as usual)")
    p.add_argument("--candidate", action="append", required=True, help="NAME:train flags")
    p.add_argument("--eval-data", action="append", default=[], help="labelled folder to evaluate each result on")
    p.add_argument("--base-preset", default="cpu", help="the preset each candidate overrides (default: cpu)")
    p.add_argument("--parallel", type=int, default=1, help="candidates run at once (default 1: timings alone)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default="tune_cpu", help="table name: <out>/<name>.md/.json")
    p.add_argument("--tta", default="none", choices=("none", "dihedral8"), help="test-time augmentation of every "
                   "evaluation (train.evaluate --tta)")
    return p


def summarise(run_dir: Path, flags: str, wall: float, eval_data: list[str], tta: str = "none",
              one_thread: bool = False) -> dict:
    """Best-epoch metrics from metrics.csv plus the best checkpoint's accuracy on its held-out split ("split": the
    test part, or val for a run without one) and on each eval folder, with per-class recall."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    best = max(rows, key=lambda r: float(r["val_macro_f1"]))
    out = {"flags": flags, "wall_s": round(wall, 1), "epochs": len(rows), "best_epoch": int(best["epoch"]),
           "val_acc": float(best["val_acc"]), "val_macro_f1": float(best["val_macro_f1"]),
           "final_val_acc": float(rows[-1]["val_acc"]), "images_per_s": float(rows[-1]["train_images_per_s"]),
           "epoch_s": sorted(float(r["epoch_s"]) for r in rows)[len(rows) // 2], "eval": {}}
    for folder in [None, *eval_data]:
        name = Path(folder).name if folder else "val"
        rep_path = run_dir / "eval" / f"{name}.json"
        rc = subprocess.call([sys.executable, "-m", "train.evaluate", "--run-dir", str(run_dir),
                              *(["--data", folder] if folder else []), "--out", str(rep_path), "--tta", tta,
                              "--save-logits", str(rep_path.with_suffix(".npz"))], stdout=subprocess.DEVNULL,
                             # one thread each when several run at once: a dozen evaluations on 16 cores took
                             # minutes with torch's default of one thread per core each (H200 job, round 3)
                             env={**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {})})
        if rc == 0:
            rep = json.loads(rep_path.read_text())
            out["eval"][name if folder else "split"] = {
                "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "tta": tta,
                "recall": {c: round(v["recall"], 4) for c, v in rep["per_class"].items() if v["support"]}}
        else:
            log.error("%s: evaluation on %s failed (exit %d)", run_dir, folder, rc)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"{args.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    pending = []
    for cand in args.candidate:
        name, _, flags = cand.partition(":")
        run_dir = out / f"tune_{name}"
        cmd = [sys.executable, "-m", "train", "--data", args.data, "--run-dir", str(run_dir),
               "--preset", args.base_preset, *shlex.split(flags)]
        pending.append((name, flags, run_dir, cmd))
    # A slot is held by a candidate while it trains and while its evaluations run (in a thread, so candidates that
    # finish together are evaluated together, not one after another).
    running: list[tuple[str, str, Path, subprocess.Popen, float]] = []
    evaluating: list[tuple[str, Future]] = []
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        while pending or running or evaluating:
            while pending and len(running) + len(evaluating) < max(1, args.parallel):
                name, flags, run_dir, cmd = pending.pop(0)
                log.info("%s: %s", name, " ".join(cmd))
                run_dir.mkdir(parents=True, exist_ok=True)
                logf = open(run_dir / "tune_stdout.log", "w")
                running.append((name, flags, run_dir, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT),
                                time.time()))
            time.sleep(2)
            for item in list(running):
                name, flags, run_dir, proc, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    log.error("%s failed (exit %d); see %s", name, proc.returncode, run_dir / "tune_stdout.log")
                    failed += 1
                    continue
                evaluating.append((name, pool.submit(summarise, run_dir, flags, time.time() - t0, args.eval_data,
                                                     args.tta, args.parallel > 1)))
            for item in [e for e in evaluating if e[1].done()]:
                evaluating.remove(item)
                name = item[0]
                results[name] = item[1].result()
                log.info("%s: %s", name, json.dumps(results[name]))
                results_path.write_text(json.dumps(results, indent=1))
                write_table(results, out / f"{args.name}.md", args)
    print((out / f"{args.name}.md").read_text() if (out / f"{args.name}.md").exists() else "no results")
    return 1 if failed else 0


def write_table(results: dict, path: Path, args: argparse.Namespace) -> None:
    evals = sorted({k for r in results.values() for k in r.get("eval", {})})
    head = ("| candidate | flags | wall min | s/epoch | epochs | best val acc | macro-F1 | final val acc | "
            + "".join(f"{e} acc | {e} macro-F1 | " for e in evals) + "recall per class (eval folders) |")
    lines = [f"# training recipe candidates ({platform.processor() or platform.machine()}, {os.cpu_count()} cores"
             f"{', parallel ' + str(args.parallel) if args.parallel > 1 else ''})", "", head,
             "|" + "---|" * (9 + 2 * len(evals))]
    for name, r in results.items():
        ev = "".join(f"{r['eval'][e]['accuracy']:.4f} | {r['eval'][e]['macro_f1']:.4f} | " if e in r.get("eval", {})
                     else "- | - | " for e in evals)
        rec = "; ".join(f"{e}: " + " ".join(f"{c[:4]} {v:.2f}" for c, v in r["eval"][e].get("recall", {}).items())
                        for e in evals if e != "split" and e in r.get("eval", {}))
        lines.append(f"| {name} | `{r['flags']}` | {r['wall_s'] / 60:.1f} | {r.get('epoch_s', 0):.1f} | {r['epochs']} "
                     f"| {r['val_acc']:.4f} | {r['val_macro_f1']:.4f} | {r['final_val_acc']:.4f} | {ev}{rec} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
