"""GPU training at the hardware's pace (issue 12): model step eager vs torch.compile, end-to-end `paper` training.

python -m benchmarks.gpu_train --data FOLDER [--epochs 3] [--batches 128 256]          (make bench-gpu)
python -m benchmarks.gpu_train --mode augment --data FOLDER                           (paper: cells vs dihedral)

speed (default): the model step alone (synthetic batch, forward + backward + AdamW, train.step.TrainStep as the
loop runs it) eager and compiled at each --batches size; the data path alone (benchmarks.train_speed.loader_rate);
then a real `python -m train --preset paper` run of --epochs epochs on --data in this process (the first
--batches size), its training img/s and seconds per epoch after the first, the first step (compile) time, the
GPU memory peak, and the share of the end-to-end time per image spent outside the model step. Sized to run in
under 8 minutes on one H100 with the defaults (two cold compiles of about a minute each, issue 12's figure,
then the run's own); not yet run on a GPU.

augment: trains each --candidate (default: paper with `cells`, paper with `dihedral`, and the `cpu` preset, on
the same split) as `python -m train` processes and scores each best.pt on the split's val and test parts:
the measurement that decides the paper preset's augmentation (README "Training: the `cpu` preset on pbc_dev"
has the CPU one that chose `dihedral` for the cpu preset).

Both write <out>/<name>.md and .json (name: gpu_train or gpu_augment) and run on CPU with tiny settings
(--device cpu --image-size 64 --batches 4 --steps 2 ...), which is how the tests run them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.train_speed import DEFAULT_DATA, _sync, build_cache, loader_rate, model_rate, preset_config

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = [
    "paper_cells:--preset paper --augment cells --epochs 40",
    "paper_dihedral:--preset paper --augment dihedral --epochs 40",
    "cpu:--preset cpu",
]


# ----------------------------------------------------------------------------- speed

def model_steps(cfg, num_classes: int, device, batches: list[int], steps: int, warmup: int, backend: str) -> list[dict]:
    """The model step eager and compiled at each batch size (benchmarks.train_speed.model_rate)."""
    import torch

    rows = []
    for batch in batches:
        cfg.batch_size = batch
        for compiled in (False, True):
            torch._dynamo.reset()  # each compiled measurement starts cold: its first step is the compile time
            t0 = time.perf_counter()
            try:
                r = model_rate(cfg.arch, num_classes, cfg, device, steps, warmup, compile=compiled, backend=backend)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                r = {"error": (str(exc).splitlines() or [""])[0][:200]}
            r.update(batch=batch, mode="compiled" if compiled else "eager", wall_s=time.perf_counter() - t0)
            rows.append(r)
            log.info("model step batch %d %s: %s", batch, r["mode"],
                     f"{r['images_per_s']:.0f} img/s" if "images_per_s" in r else r["error"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def end_to_end(args, device, batch: int) -> dict:
    """A real training run of the preset (python -m train's own config resolution) in this process."""
    import torch

    from train.config import get_args_parser, resolve_config
    from train.engine import fit, read_metrics

    run_dir = Path(args.runs_dir) / f"e2e_{args.preset}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time: this folder belongs to the benchmark
    argv = ["--data", args.data, "--run-dir", str(run_dir), "--preset", args.preset, "--epochs", str(args.epochs),
            "--batch-size", str(batch), "--compile", args.e2e_compile, "--device", args.device,
            "--workers", str(args.workers), "--plots", "false", "--max-steps-per-epoch", str(args.max_steps_per_epoch)]
    for flag, value in (("--arch", args.arch), ("--image-size", args.image_size), ("--augment", args.augment),
                        ("--threads", args.threads)):
        if value:
            argv += [flag, str(value)]
    cfg = resolve_config(get_args_parser().parse_args(argv))
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        fit(cfg)
    finally:
        _detach_run_log(run_dir)
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir / "metrics.csv")
    steady = rows[1:] or rows  # epoch 1 holds the compile and cuDNN's algorithm search
    med = lambda key: sorted(r[key] for r in steady)[len(steady) // 2]  # noqa: E731
    text = (run_dir / "train.log").read_text()
    first = {kind: float(s) for kind, s in re.findall(r"first (compiled|eager) training step \(batch \d+.*?\) took "
                                                        r"([0-9.]+) s", text)}
    resident = re.search(r"training images (resident on the GPU|gathered in pinned host memory)", text)
    out = {"run_dir": str(run_dir), "argv": argv, "data": cfg.data, "preset": cfg.preset, "arch": cfg.arch,
           "image_size": cfg.image_size, "batch_size": cfg.batch_size, "augment": cfg.augment,
           "compile": cfg.compile, "epochs": len(rows),
           "train_images": len(json.loads((run_dir / "split.json").read_text())["train"]),
           "per_epoch": [{k: r[k] for k in ("epoch", "epoch_s", "train_images_per_s", "val_acc")} for r in rows],
           "first_epoch_s": rows[0]["epoch_s"], "steady_epoch_s": med("epoch_s"),
           "steady_train_images_per_s": med("train_images_per_s"), "first_step_s": first,
           "data_on_gpu": resident.group(1) if resident else "n/a (CPU)", "wall_s": wall}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def _detach_run_log(run_dir: Path) -> None:
    """fit() logs into <run_dir>/train.log through a root handler; stop that once the run is over."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir.resolve():
            root.removeHandler(h)
            h.close()


def speed(args, device) -> dict:
    import torch

    from train.data import scan_dataset

    cfg = preset_config(args.preset, args.image_size, None)
    cfg.arch = args.arch or cfg.arch
    if args.augment:
        cfg.augment = args.augment
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.engine.fit does
    classes = scan_dataset(args.data).classes
    doc: dict = {"mode": "speed", "preset": args.preset, "arch": cfg.arch, "image_size": cfg.image_size,
                 "augment": cfg.augment}
    doc["model_step"] = model_steps(cfg, len(classes), device, args.batches, args.steps, args.warmup,
                                    args.compile_backend)
    cfg.batch_size = args.batches[0]
    cache, cache_info = build_cache(args.data, cfg, args.per_class, args.workers)
    doc["data_path"] = {**loader_rate(cache, cfg, device, args.steps, args.warmup), "cache": cache_info,
                        "batch": cfg.batch_size}
    del cache
    doc["e2e"] = e2e = end_to_end(args, device, args.batches[0])
    mode = "compiled" if e2e["first_step_s"].get("compiled") is not None else "eager"
    ref = next((r for r in doc["model_step"] if r["batch"] == e2e["batch_size"] and r["mode"] == mode
                and "images_per_s" in r), None)
    if ref is not None:
        model_per_image, e2e_per_image = 1 / ref["images_per_s"], 1 / e2e["steady_train_images_per_s"]
        doc["comparison"] = {"model_step_mode": mode, "model_step_images_per_s": ref["images_per_s"],
                             "e2e_images_per_s": e2e["steady_train_images_per_s"],
                             "model_over_e2e": ref["images_per_s"] / e2e["steady_train_images_per_s"],
                             "share_outside_model_step": 1 - model_per_image / e2e_per_image}
    return doc


def format_speed(doc: dict) -> str:
    e = doc["e2e"]
    lines = [f"# GPU training speed: {doc['device']}", "", _machine_line(doc), "",
             f"`{doc['arch']}` at {doc['image_size']} px, precision {doc['model_step'][0].get('precision', '?')}, "
             f"channels_last; model step = forward + backward + AdamW on a synthetic batch "
             "(train.step.TrainStep, as the loop runs it); compiled = torch.compile, dynamic=False, backend "
             f"`{doc['compile_backend']}` (first step = trace + compile, not in the rate).", "",
             "## Model step", "", "| batch | mode | img/s | step ms | first step s | GPU memory peak GB |",
             "|---|---|---|---|---|---|"]
    for r in doc["model_step"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['mode']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['mode']} | {r['images_per_s']:.0f} | {1000 * r['step_s_median']:.1f} | "
                     f"{_num(r.get('first_step_s'), '.1f')} | {_num(r.get('peak_memory_gb'), '.2f')} |")
    d = doc["data_path"]
    lines += ["", f"Data path alone (gather from the {'GPU-resident' if d['resident_on_gpu'] else 'host'} cache, "
              f"/255, `{d['augment']}` augmentation, channels_last; batch {d['batch']}): "
              f"{d['images_per_s']:.0f} img/s.", "",
              f"## End to end: `python -m train --preset {e['preset']}` on {e['data']}", "",
              f"{e['train_images']} training images, batch {e['batch_size']}, `{e['augment']}` augmentation, "
              f"--compile {e['compile']}, {e['epochs']} epochs; training images {e['data_on_gpu']}.", "",
              "| | value |", "|---|---|",
              "| training img/s (epochs after the first, median; the loop only) | "
              f"**{e['steady_train_images_per_s']:.0f}** |",
              "| seconds per epoch (after the first; incl. validation, checkpoint hand-off) | "
              f"{e['steady_epoch_s']:.2f} |",
              f"| first epoch s (incl. compile) | {e['first_epoch_s']:.1f} |",
              f"| first step s | {', '.join(f'{k} {v:.1f}' for k, v in e['first_step_s'].items()) or 'n/a'} |",
              f"| GPU memory peak GB | {_num(e.get('peak_memory_gb'), '.2f')} |",
              f"| wall s (decode, compile, all epochs) | {e['wall_s']:.0f} |"]
    c = doc.get("comparison")
    if c:
        lines += ["", f"Model step ({c['model_step_mode']}) {c['model_step_images_per_s']:.0f} img/s vs end to end "
                  f"{c['e2e_images_per_s']:.0f} img/s: **{c['model_over_e2e']:.2f}x**; "
                  f"**{100 * c['share_outside_model_step']:.0f}%** of the loop's time per image is spent outside "
                  "the model step (gather, augmentation, scheduler, Python; validation and checkpoints are not in "
                  "the loop's rate)."]
    lines += ["", "Per epoch: " + ", ".join(f"{r['epoch']}: {r['epoch_s']:.2f} s / {r['train_images_per_s']:.0f} img/s"
                                           for r in e["per_epoch"]), "",
              "Compile times are cold for the model-step rows (torch._dynamo.reset() before each); the end-to-end "
              "run may reuse Inductor's on-disk cache from them, so its first epoch can understate a cold start.",
              f"Total benchmark wall time: {doc['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- augment

def evaluate_parts(run_dir: Path, device, workers: int) -> dict:
    """best.pt on every part of the run's split.json that it did not train on (val, test when present)."""
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import ImageCache, load_split_samples
    from train.engine import predict_logits, to_tensor_nchw
    from train.metrics import report

    ck = load_checkpoint(run_dir / "best.pt")
    model, prep, classes = model_from_checkpoint(ck, run_dir / "best.pt")
    model.to(device)
    split = json.loads((run_dir / "split.json").read_text())
    out = {"best_epoch": ck.get("epoch")}
    for part in ("val", "test"):
        if not split.get(part):
            continue
        cache = ImageCache.build(load_split_samples(run_dir / "split.json", part), prep, workers)
        logits = predict_logits(model, to_tensor_nchw(cache.images), device)
        rep = report(cache.labels, logits.argmax(1).numpy(), classes)
        out[part] = {k: rep[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
        out[part]["accuracy_95ci"] = _wilson(round(rep["accuracy"] * rep["n"]), rep["n"])
    return out


def _wilson(k: int, n: int) -> list[float] | None:
    try:
        from export.verify import wilson
    except ImportError:  # export's runtimes are not installed (a bare GPU machine)
        return None
    return list(wilson(k, n))


def augment(args, device, emit) -> dict:
    """Train and score each candidate; emit(doc) after each, so a time limit keeps the finished ones."""
    import yaml

    from train.engine import read_metrics

    doc: dict = {"mode": "augment", "candidates": []}
    for cand in args.candidate or DEFAULT_CANDIDATES:
        name, _, flags = cand.partition(":")
        run_dir = Path(args.runs_dir) / f"aug_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "train", "--data", args.data, "--run-dir", str(run_dir), "--device", args.device,
               "--workers", str(args.workers), "--plots", "false", *shlex.split(flags), *shlex.split(args.train_args)]
        log.info("candidate %s: %s", name, shlex.join(cmd))
        t0 = time.perf_counter()
        with open(Path(args.out) / f"gpu_augment_{name}.log", "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        entry = {"name": name, "flags": flags, "train_args": args.train_args, "rc": rc,
                 "wall_s": time.perf_counter() - t0}
        if rc == 0:
            rows = read_metrics(run_dir / "metrics.csv")
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            entry.update(epochs=len(rows), arch=cfg["arch"], image_size=cfg["image_size"], augment=cfg["augment"],
                         preset=cfg["preset"], compile=cfg.get("compile"),
                         train_images_per_s=sorted(r["train_images_per_s"] for r in rows)[len(rows) // 2],
                         final_val_acc=rows[-1]["val_acc"], **evaluate_parts(run_dir, device, args.workers))
        else:
            log.error("candidate %s failed (exit %d): see %s", name, rc, Path(args.out) / f"gpu_augment_{name}.log")
        doc["candidates"].append(entry)
        emit(doc)
    return doc


def format_augment(doc: dict) -> str:
    lines = [f"# The paper preset's augmentation: {doc['device']}", "", _machine_line(doc), "",
             "Each candidate trained on the same split of the same folder (seed 0), scored with its best.pt "
             "(chosen by validation macro-F1); **test** is never used for training or selection.", "",
             "| candidate | flags | epochs | best epoch | val acc | test acc (95% CI) | test macro-F1 | "
             "train img/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in doc["candidates"]:
        if c["rc"] != 0:
            lines.append(f"| {c['name']} | `{c['flags']}` | failed (exit {c['rc']}) | | | | | | {c['wall_s']:.0f} |")
            continue
        lines.append(f"| {c['name']} | `{c['flags']}` | {c['epochs']} | {c['best_epoch']} | {_acc(c.get('val'))} | "
                     f"{_acc(c.get('test'), ci=True)} | {_pct(c.get('test'), 'macro_f1')} | "
                     f"{c['train_images_per_s']:.0f} | {c['wall_s']:.0f} |")
    lines += ["", f"Extra train flags for every candidate: `{doc['train_args'] or '(none)'}`. "
              f"Total wall time {doc['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def _pct(part: dict | None, key: str) -> str:
    return f"{100 * part[key]:.1f}%" if part else "n/a"


def _acc(part: dict | None, ci: bool = False) -> str:
    """'97.3% (94.9-98.6) of 264': accuracy, its 95% Wilson interval, the number of images."""
    if not part:
        return "no such part"
    interval = part.get("accuracy_95ci") if ci else None
    return (_pct(part, "accuracy") + (f" ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})" if interval else "")
            + f" of {part['n']}")


# ----------------------------------------------------------------------------- shared

def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def _machine_line(doc: dict) -> str:
    m = doc["machine"]
    card = f" (compute capability {doc['capability']})" if doc.get("capability") else ""
    return (f"Device: **{doc['device']}**{card}; torch {doc['torch']}; host {m['cpu']} "
            f"({m['usable_cores']} usable cores).")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["speed", "augment"], default="speed")
    p.add_argument("--data", default=os.environ.get("PBC_DEV", DEFAULT_DATA), help="labelled folder to train on")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default="paper", help="speed: the preset measured (default paper)")
    p.add_argument("--arch", help="speed: override the preset's architecture")
    p.add_argument("--image-size", type=int, help="speed: override the preset's image size")
    p.add_argument("--augment", help="speed: override the preset's augmentation")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256],
                   help="speed: model-step batch sizes; the first is also the end-to-end run's")
    p.add_argument("--steps", type=int, default=20, help="speed: timed model steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="speed: untimed steps first (at least 1 when compiled)")
    p.add_argument("--compile-backend", default="inductor", help="speed: torch.compile backend of the model-step rows")
    p.add_argument("--epochs", type=int, default=3, help="speed: epochs of the end-to-end run")
    p.add_argument("--e2e-compile", default="auto", choices=["auto", "on", "off"], help="speed: the run's --compile")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="speed: cap the run's epochs (tiny CPU runs)")
    p.add_argument("--per-class", type=int, default=32, help="speed: images per class for the data-path rate")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--candidate", action="append", help="augment: NAME:train flags (repeatable; default: "
                   + "; ".join(DEFAULT_CANDIDATES) + ")")
    p.add_argument("--train-args", default="", help="augment: flags appended to every candidate")
    p.add_argument("--workers", type=int, default=2, help="decode processes")
    p.add_argument("--runs-dir", default="runs/gpu_bench", help="where the training runs go (replaced each time)")
    p.add_argument("--out", default="runs/bench", help="folder for <name>.md and .json")
    p.add_argument("--name", help="output name (default gpu_train / gpu_augment)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    import torch

    from benchmarks.latency import machine_info
    from train.config import PRESETS
    from train.data import DatasetError

    if args.preset not in PRESETS:
        log.error("unknown preset %s; valid: %s", args.preset, ", ".join(PRESETS))
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but no CUDA GPU is available")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    args.device = device.type  # the training runs use exactly this device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("gpu_train" if args.mode == "speed" else "gpu_augment")
    on_gpu = device.type == "cuda"
    header = {"device": torch.cuda.get_device_name(device) if on_gpu else "CPU",
              "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if on_gpu else None,
              "torch": torch.__version__, "machine": machine_info(), "compile_backend": args.compile_backend,
              "train_args": args.train_args}
    t0 = time.perf_counter()

    def emit(doc: dict) -> str:
        doc.update(header, wall_s=time.perf_counter() - t0)
        md = format_speed(doc) if args.mode == "speed" else format_augment(doc)
        (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
        (out / f"{name}.md").write_text(md)
        return md

    try:
        doc = speed(args, device) if args.mode == "speed" else augment(args, device, emit)
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    _sync(device)
    print(emit(doc))
    if args.mode == "augment" and any(c["rc"] != 0 for c in doc["candidates"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
