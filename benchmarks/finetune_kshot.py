"""Few-shot fine-tuning benchmark: held-out accuracy of `train.finetune` for K labelled cells per class.

python -m benchmarks.finetune_kshot --from runs/gpu_c_rc_od_ls --data ../shared/data/crosslab_dev --out runs/bench

For every K in --shots and every draw (seed 0 .. --draws - 1) this runs `python -m train.finetune
--shots K --seed S` in a fresh process (one run's logging and threads cannot leak into the next) into
<out>/finetune_k{K}_s{S}, then reads that run's finetune.json. It owns <out>/finetune_kshot.json (every
run, the per-K summary and the machine) and <out>/finetune_kshot.md (the table). A run folder that
already holds a complete run with the same settings is reused (--force re-runs it); any other
existing folder of that name is removed and run again. Seconds are train.finetune's own wall time
(data loading, training, held-out evaluation; not the interpreter start), on a CPU that may be shared:
the load average before and after is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SHOTS = (5, 10, 20)
DEFAULT_DRAWS = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_kshot", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="from_run", required=True, help="trained run folder or checkpoint (best.pt)")
    p.add_argument("--data", required=True, help="the new lab's labelled folder of class folders")
    p.add_argument("--out", default="runs/bench", help="results folder (default runs/bench)")
    p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS),
                   help=f"images per class to train on (default {' '.join(map(str, DEFAULT_SHOTS))})")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS,
                   help=f"random draws of the shots per K: seeds 0 .. draws-1 (default {DEFAULT_DRAWS})")
    p.add_argument("--epochs", type=int, default=None, help="passed to train.finetune (default: its own, 40)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per fine-tune (0: torch's default)")
    p.add_argument("--tta", default="none", choices=("none", "dihedral8"),
                   help="held-out evaluation with this test-time augmentation (passed to train.finetune)")
    p.add_argument("--head-epochs", type=int, default=0, help="passed to train.finetune: first train only the "
                   "classifier layer this many epochs (LP-FT; default 0: off)")
    p.add_argument("--image-size", type=int, default=0, help="passed to train.finetune: fine-tune (and export) at "
                   "exactly this input size (default 0: train.finetune's choice, the parent's but at least 96 px)")
    p.add_argument("--mixup", type=float, default=None, help="passed to train.finetune: mixup's Beta alpha while the "
                   "whole network trains (default: train.finetune's own; 0: off)")
    p.add_argument("--panel", default="", help="also report the held-out accuracy on this panel (train.finetune "
                   "--panel: wbc5, wbc6 or a class list)")
    p.add_argument("--force", action="store_true", help="re-run fine-tunes whose complete results already exist")
    return p


def cpu_info() -> dict:
    """The machine the seconds were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"cpu_model": model or platform.processor() or platform.machine(), "processor": platform.processor(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def run_settings(from_run: str, data: str, shots: int, seed: int, epochs: int | None, tta: str = "none",
                 panel: str = "", head_epochs: int = 0, image_size: int = 0, mixup: float | None = None) -> dict:
    """What a finished run must have been made with for it to be reused."""
    from train.finetune import FinetuneConfig

    return {"from_run": str(from_run), "data": str(data), "shots": shots, "seed": seed,
            "epochs": epochs if epochs is not None else FinetuneConfig().epochs, "tta": tta,
            **({"panel": panel} if panel else {}), "head_epochs": head_epochs, "image_size": image_size,
            "mixup": mixup if mixup is not None else FinetuneConfig().mixup, "min_image_size": FinetuneConfig().min_image_size,
            "upsize_min_per_class": FinetuneConfig().upsize_min_per_class}


# settings a run made before the option existed was made with (its config.yaml does not name them): before
# upsize_min_per_class, min_image_size applied whatever the number of shots
_BEFORE_THE_OPTION = {"head_epochs": 0, "image_size": 0, "min_image_size": 0, "upsize_min_per_class": 0, "mixup": 0.0}


def completed(run_dir: Path, settings: dict) -> dict | None:
    """finetune.json of a complete run in run_dir made with `settings`, else None."""
    import yaml

    try:
        result = json.loads((run_dir / "finetune.json").read_text())
        ft = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("finetune") or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not (run_dir / "best.pt").is_file() or any(ft.get(k, _BEFORE_THE_OPTION.get(k)) != v
                                                  for k, v in settings.items()):
        return None
    return result


def run_finetune(from_run: str, data: str, run_dir: Path, shots: int, seed: int, epochs: int | None = None,
                 threads: int = 0, force: bool = False, tta: str = "none", panel: str = "",
                 head_epochs: int = 0, image_size: int = 0, mixup: float | None = None) -> dict:
    """One fine-tune in a child process; its finetune.json plus the process's own wall seconds."""
    settings = run_settings(from_run, data, shots, seed, epochs, tta, panel, head_epochs, image_size, mixup)
    if not force and (done := completed(run_dir, settings)) is not None:
        log.info("k=%d seed=%d: reusing the complete run in %s", shots, seed, run_dir)
        return {**done, "reused": True}
    if run_dir.exists():
        log.info("k=%d seed=%d: replacing %s", shots, seed, run_dir)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "train.finetune", "--from", str(from_run), "--data", str(data),
           "--run-dir", str(run_dir), "--shots", str(shots), "--seed", str(seed)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if threads:
        cmd += ["--threads", str(threads)]
    if tta != "none":
        cmd += ["--tta", tta]
    if panel:
        cmd += ["--panel", panel]
    if head_epochs:
        cmd += ["--head-epochs", str(head_epochs)]
    if image_size:
        cmd += ["--image-size", str(image_size)]
    if mixup is not None:
        cmd += ["--mixup", str(mixup)]
    log.info("k=%d seed=%d: %s", shots, seed, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"fine-tune k={shots} seed={seed} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads((run_dir / "finetune.json").read_text())
    log.info("k=%d seed=%d: held-out accuracy %.4f, macro-F1 %.4f, %.1f s", shots, seed,
             result["held_out_accuracy"], result["held_out_macro_f1"], result["wall_s"])
    return {**result, "process_s": round(process_s, 1), "reused": False}


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single draw."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}..{max(values)}"


def summarise(runs: list[dict]) -> list[dict]:
    """Per K: draws, image counts, accuracy / macro-F1 mean, std, min, max, and mean seconds."""
    rows = []
    for k in sorted({r["shots"] for r in runs}):
        rs = [r for r in runs if r["shots"] == k]
        acc = [r["held_out_accuracy"] for r in rs]
        f1 = [r["held_out_macro_f1"] for r in rs]
        rows.append({"shots": k, "draws": len(rs), "seeds": [r["seed"] for r in rs],
                     "train_images": sorted({r["train_images"] for r in rs}),
                     "held_out_images": sorted({r["held_out_images"] for r in rs}),
                     # the fine-tune's input size (finetune.json of runs older than session 15 does not say)
                     "input_px": sorted({r["image_size"] for r in rs if r.get("image_size")}),
                     "accuracy_mean": statistics.fmean(acc), "accuracy_std": _std(acc),
                     "accuracy_min": min(acc), "accuracy_max": max(acc),
                     "macro_f1_mean": statistics.fmean(f1), "macro_f1_std": _std(f1),
                     "macro_f1_min": min(f1), "macro_f1_max": max(f1),
                     "seconds_mean": statistics.fmean(r["wall_s"] for r in rs)})
        panel = [r["held_out_accuracy_panel"] for r in rs if r.get("held_out_accuracy_panel") is not None]
        if panel and len(panel) == len(rs):
            rows[-1].update(panel_accuracy_mean=statistics.fmean(panel), panel_accuracy_std=_std(panel),
                            panel_accuracy_min=min(panel), panel_accuracy_max=max(panel))
    return rows


def format_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Few-shot fine-tuning: {result['from']} on {result['data']}", "",
             f"`{result['command']}`", "",
             f"K random images per class to train on (all of a class with K or fewer), the rest held out; "
             + (f"first {result['head_epochs']} epochs of the classifier layer alone, then " if result.get("head_epochs") else "")
             + f"{result['epochs']} epochs" + (f" with mixup (alpha {result['mixup']})" if result.get("mixup") else "")
             + ", final epoch kept"
             + (f", at {result['image_size']} px" if result.get("image_size") else
                f", at the parent's input size but at least {result['min_image_size']} px"
                + (f" once the median class has {result['upsize_min_per_class']} training images"
                   if result.get("upsize_min_per_class") else "")
                if result.get("min_image_size") else "") + ". Mean ± sample std over the draws (seeds), "
             f"min..max in brackets. Seconds: train.finetune's wall time per fine-tune. Held-out images evaluated "
             f"with test-time augmentation {result.get('tta', 'none')}.", "",
             "| k | draws | train images | held-out images | input px | accuracy % mean ± std (min..max) | "
             + (f"accuracy on the {panel} panel % mean ± std (min..max) | " if (panel := result.get("panel")) else "")
             + "macro-F1 % mean ± std (min..max) | seconds (mean) |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if panel else "")]
    for r in result["summary"]:
        on = (f"{100 * r['panel_accuracy_mean']:.1f} ± {100 * r['panel_accuracy_std']:.1f} "
              f"({100 * r['panel_accuracy_min']:.1f}..{100 * r['panel_accuracy_max']:.1f}) | "
              if panel and "panel_accuracy_mean" in r else ("– | " if panel else ""))
        lines.append(
            f"| {r['shots']} | {r['draws']} | {_span(r['train_images'])} | {_span(r['held_out_images'])} | "
            f"{_span(r['input_px']) if r.get('input_px') else '–'} | "
            f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} "
            f"({100 * r['accuracy_min']:.1f}..{100 * r['accuracy_max']:.1f}) | {on}"
            f"{100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f} "
            f"({100 * r['macro_f1_min']:.1f}..{100 * r['macro_f1_max']:.1f}) | {r['seconds_mean']:.0f} |")
    load = result["load_average"]
    lines += ["", f"Machine: {m['cpu_model']} (platform.processor(): {m['processor'] or 'n/a'}), "
              f"{m['cpu_count']} cores ({m['usable_cores']} usable), {m['system']}, Python {m['python']}; "
              f"torch threads: {result['threads'] or 'default'}. Load average (1 min) before {load['before']:.2f}, "
              f"after {load['after']:.2f}: other jobs may have shared the CPU.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from train.data import atomic_write_text
    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    if args.draws < 1 or any(k < 1 for k in args.shots):
        log.error("--shots values and --draws must be >= 1")
        return 2
    src = Path(args.from_run)
    if not (src / "best.pt" if src.is_dir() else src).is_file():
        log.error("--from %s: no checkpoint there (expected a run folder with best.pt, or a .pt file)", src)
        return 2
    if not Path(args.data).exists():
        log.error("--data %s: no such folder", args.data)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    runs = []
    try:
        for k in args.shots:
            for seed in range(args.draws):
                runs.append(run_finetune(args.from_run, args.data, out / f"finetune_k{k}_s{seed}", k, seed,
                                         args.epochs, args.threads, args.force, args.tta, args.panel,
                                         args.head_epochs, args.image_size, args.mixup))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    from train.finetune import FinetuneConfig

    result = {"command": "python -m benchmarks.finetune_kshot " + " ".join(argv if argv is not None else sys.argv[1:]),
              "from": str(args.from_run), "data": str(args.data), "shots": args.shots, "draws": args.draws,
              "epochs": args.epochs if args.epochs is not None else FinetuneConfig().epochs, "threads": args.threads,
              "tta": args.tta, "panel": args.panel or None, "head_epochs": args.head_epochs,
              "mixup": args.mixup if args.mixup is not None else FinetuneConfig().mixup, "image_size": args.image_size or None, "min_image_size": FinetuneConfig().min_image_size,
              "upsize_min_per_class": FinetuneConfig().upsize_min_per_class, "machine": cpu_info(), "load_average": {"before": load_before, "after": os.getloadavg()[0]},
              "summary": summarise(runs), "runs": runs}
    atomic_write_text(out / "finetune_kshot.json", json.dumps(result, indent=1))
    atomic_write_text(out / "finetune_kshot.md", format_markdown(result))
    log.info("wrote %s and %s\n%s", out / "finetune_kshot.json", out / "finetune_kshot.md", format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
