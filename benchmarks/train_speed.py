"""Training images/s per architecture (model step on synthetic tensors) next to the data path's own rate."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

NOTES = """\
The data path is the one train.engine.fit runs: decode once into train.data.ImageCache (real images),
then per step gather a batch (train.step.TrainBatches: from RAM on CPU, from GPU memory on CUDA), scale to
0..1, the preset's augmentation, channels_last. It
runs in the training process between model steps, so the end-to-end rate is 1 / (1/model + 1/loader);
loader/model > 1 means the model, not the data, sets the pace.
"""

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc_dev")  # as tests/conftest.py


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_rate(arch: str, num_classes: int, cfg, device, steps: int, warmup: int, compile: bool = False,
               backend: str = "inductor") -> dict:
    """Images/s of forward + backward + optimizer step on random [B, 3, S, S] tensors, with the training loop's own
    step (train.step.TrainStep: its precision choice, fused AdamW on CUDA, and torch.compile when asked).

    With compile the first step (tracing + compiling) is reported apart as first_step_s and is never timed;
    peak_memory_gb is the GPU's allocation peak over the whole measurement.
    """
    import torch

    from train.models import create_model
    from train.step import TrainStep, choose_precision, cuda_capability, make_optimizer

    torch.manual_seed(0)
    model = create_model(arch, num_classes, cfg.mean, cfg.std, cfg.input_norm).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    precision = choose_precision(device.type, cfg.amp, cfg.amp_dtype, cuda_capability(device))
    opt = make_optimizer(model, cfg, fused=on_gpu and cfg.optimizer in ("adamw", "adam"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    b, s = cfg.batch_size, cfg.image_size
    step = TrainStep(model, opt, scaler, precision, device, compile=compile, static_batch=b, backend=backend,
                     compile_setting="on")
    x = torch.rand(b, 3, s, s, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (b,), device=device)

    for _ in range(max(warmup, 1) if compile else warmup):
        step(x, y)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    out = {"step_s_median": med, "images_per_s": b / med, "steps": steps, "precision": precision.name,
           "compiled": compile, "first_step_s": step.first_step_s.get("compiled" if compile else "eager")}
    if on_gpu:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def build_cache(data: str, cfg, per_class: int, workers: int):
    """A real ImageCache of per_class images of every class (the first ones in sorted order), preprocessed and
    (for zooming augmentations) with 2x sources exactly as the preset's training does; decode rate too."""
    from train.augment import AUGMENTS, source_scale
    from train.data import ImageCache, Samples, scan_dataset
    from train.engine import preprocessing_of

    full = scan_dataset(data)
    keep: list[int] = []
    seen: dict[int, int] = {}
    for i, lab in enumerate(full.labels):
        if seen.get(lab, 0) < per_class:
            keep.append(i)
            seen[lab] = seen.get(lab, 0) + 1
    sample = Samples(full.root, [full.paths[i] for i in keep], [full.labels[i] for i in keep], full.classes)
    t0 = time.perf_counter()
    cache = ImageCache.build(sample, preprocessing_of(cfg), workers, source_scale(AUGMENTS[cfg.augment]))
    dt = time.perf_counter() - t0
    return cache, {"images": len(cache), "decode_s": dt, "decode_images_per_s": len(cache) / dt, "workers": workers,
                   "root": str(full.root)}


def loader_rate(cache, cfg, device, steps: int, warmup: int) -> dict:
    """Images/s of the per-step data path of train.engine.fit: train.step.TrainBatches (gather from RAM on CPU,
    from the GPU-resident cache on CUDA), /255, augment on the device, layout."""
    import torch

    from train.augment import AUGMENTS
    from train.step import TrainBatches, augment_batch

    batches = TrainBatches(cache.images, cache.labels, cache.sources, device)
    augment = AUGMENTS[cfg.augment]
    g = torch.Generator().manual_seed(0)
    b = cfg.batch_size

    def step() -> None:
        # the balanced sampler draws with replacement too
        order = batches.epoch_order(torch.randint(0, len(batches), (b,), generator=g))
        x, _, src = batches.batch(order, 0, b)
        augment_batch(x, src, augment, cfg.channels_last)

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"step_s_median": med, "images_per_s": b / med, "steps": steps, "augment": cfg.augment,
            "resident_on_gpu": batches.resident}


def preset_config(preset: str, image_size: int | None, batch: int | None):
    from train.config import PRESETS, TrainConfig

    over = {k: v for k, v in PRESETS[preset].items() if k != "arch"}
    cfg = TrainConfig(**{**over, "preset": preset, "data": "-"})
    if image_size:
        cfg.image_size = image_size
    if batch:
        cfg.batch_size = batch
    return cfg


def format_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Training speed ({doc['device']}, {doc['threads']} torch threads)", "",
             f"Machine: {m['cpu']} ({m['usable_cores']} usable cores), torch {m['versions'].get('torch')}.",
             "Model: forward + backward + AdamW step on synthetic tensors of the preset's shape (as train.engine). "
             "Loader: the engine's per-step data path on a real ImageCache (gather, /255, the preset's augmentation, "
             "channels_last). Both run in the training process one after the other, so end-to-end = "
             "1 / (1/model + 1/loader).", ""]
    load = doc["load_average"]
    if max(load["before"][0], load["after"][0]) > 0.5:
        lines += [f"**Warning: the machine was busy (1-min load average {load['before'][0]:.2f} before, "
                  f"{load['after'][0]:.2f} after): rates include contention.**", ""]
    for p in doc["presets"]:
        c = p["cache"]
        lines += [f"## preset `{p['preset']}`: {p['image_size']} px, batch {p['batch_size']}", "",
                  f"Decoding into the cache (once per run): {c['decode_images_per_s']:.0f} images/s "
                  f"({c['images']} real images from {c['root']}, {c['workers']} workers).", "",
                  "| model | model img/s | loader img/s | loader / model | end-to-end img/s | step s |",
                  "|---|---|---|---|---|---|"]
        lr = p["loader"]["images_per_s"]
        for r in p["models"]:
            if "error" in r:
                lines.append(f"| {r['arch']} | failed: {r['error']} | {lr:.0f} | | | |")
                continue
            mr = r["images_per_s"]
            lines.append(f"| {r['arch']} | {mr:.1f} | {lr:.0f} | {lr / mr:.1f} | {1 / (1 / mr + 1 / lr):.1f} | "
                         f"{r['step_s_median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__, epilog=NOTES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="train preset(s) giving image size and batch (default: cpu)")
    p.add_argument("--arch", action="append", help="architecture (repeatable; default: all seven)")
    p.add_argument("--data", default=os.environ.get("PBC_DEV", DEFAULT_DATA), help="real images for the loader")
    p.add_argument("--per-class", type=int, default=32, help="images per class decoded into the cache")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--batch", type=int, help="override the preset's batch size")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=2, help="decode processes for the cache")
    p.add_argument("--out", default="runs/bench", help="folder for train_speed.md and .json")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    import torch

    from benchmarks.latency import machine_info
    from train.config import PRESETS
    from train.data import DatasetError
    from train.models import ARCHS

    archs = args.arch or list(ARCHS)
    presets = args.preset or ["cpu"]
    bad = [a for a in archs if a not in ARCHS] + [p for p in presets if p not in PRESETS]
    if bad:
        log.error("unknown architecture/preset %s; valid archs: %s; presets: %s", ", ".join(bad), ", ".join(ARCHS),
                  ", ".join(PRESETS))
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but no CUDA GPU is available")
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()
    doc = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "threads": torch.get_num_threads(), "machine": machine_info(), "presets": []}
    caches: dict[tuple, tuple] = {}
    for preset in presets:
        cfg = preset_config(preset, args.image_size, args.batch)
        key = (cfg.image_size, cfg.crop, cfg.augment)
        if key not in caches:
            try:
                caches[key] = build_cache(args.data, cfg, args.per_class, args.workers)
            except DatasetError as exc:
                log.error("%s", exc)
                return 2
        cache, cache_info = caches[key]
        entry = {"preset": preset, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                 "channels_last": cfg.channels_last, "amp": cfg.amp and device.type == "cuda", "cache": cache_info,
                 "loader": loader_rate(cache, cfg, device, args.steps, args.warmup), "models": []}
        log.info("preset %s: loader %.0f img/s at %d px, batch %d", preset, entry["loader"]["images_per_s"],
                 cfg.image_size, cfg.batch_size)
        for arch in archs:
            try:
                r = model_rate(arch, len(cache.classes), cfg, device, args.steps, args.warmup)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                r = {"error": (str(exc).splitlines() or [""])[0][:200]}
            entry["models"].append({"arch": arch, **r})
            log.info("preset %s %s: %s", preset, arch, f"{r['images_per_s']:.1f} img/s" if "images_per_s" in r
                     else r["error"])
        doc["presets"].append(entry)
    doc["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(doc)
    (out / "train_speed.json").write_text(json.dumps(doc, indent=1))
    (out / "train_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
