"""The training loop: data decoded once (kept on the GPU when it fits), balanced batches, augment on device, resume."""
from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cellcore.files import atomic_write_text
from train import plots
from train.augment import AUGMENTS, source_scale
from train.checkpoint import (CHECKPOINT_VERSION, BackgroundWriter, CheckpointError, load_checkpoint, save_atomic,
                              snapshot)
from train.config import TrainConfig, resume_mismatch
from train.data import ClassMap, ImageCache, Samples, load_split_samples, save_split, scan_dataset, stratified_split
from train.distributed import Dist, barrier, decode_once, init_distributed, leader_first
from train.metrics import format_report, report
from train.models import count_params, create_model
from train.preprocess import Preprocessing
from train.sampler import DistributedBalancedSampler, make_sampler
from train.step import (EpochMeter, TrainBatches, TrainStep, augment_batch, choose_precision, cuda_capability,
                        make_optimizer, mixup_batch, resolve_compile)

log = logging.getLogger("train")

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_f1",
                 "lr", "epoch_s", "train_images_per_s", "elapsed_s"]
# On CUDA the loop reads its device-side loss/accuracy sums (a host sync) every this many steps at most, for the
# progress bar and the non-finite-loss check; on CPU, where a sync costs nothing, every step as always.
SYNC_EVERY_CUDA = 50


# ----------------------------------------------------------------------------- set-up helpers

def pick_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    torch.cuda.set_device(dist.local_rank)
    return torch.device("cuda", dist.local_rank)


def setup_logging(run_dir: Path | None, main: bool = True) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # coremltools logs every graph pass at INFO; keep our logs readable
    for noisy in ("coremltools", "torch._export", "torch.onnx", "onnxscript", "executorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_cellvit", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h._cellvit = True  # type: ignore[attr-defined]
        root.addHandler(h)
    if run_dir is not None and main:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        fh._cellvit = True  # type: ignore[attr-defined]
        root.addHandler(fh)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to min_lr (or constant). Returns a multiplier of cfg.lr."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig, run_dir: Path, dist: Dist) -> tuple[ImageCache, ImageCache | None, Samples]:
    """Scan, split (or reuse the saved split when resuming) and decode train and val into RAM.

    Under DDP the first process of each machine extracts a .zip and decodes the training images; the other
    ranks wait and memory-map its result (train.distributed.decode_once). Only rank 0 validates, so only it
    decodes the validation images; the others get None.
    """
    class_map = ClassMap.load(cfg.class_map or None)
    samples = leader_first(dist, lambda: scan_dataset(cfg.data, class_map, seed=cfg.seed))
    split_path = run_dir / "split.json"
    if cfg.resume and split_path.exists():
        train_s = load_split_samples(split_path, "train", samples.root)
        val_s = load_split_samples(split_path, "val", samples.root)
        if train_s.classes != samples.classes:
            raise CheckpointError(f"{split_path}: classes {train_s.classes} differ from the data's {samples.classes}")
    else:
        # The test part is written to split.json and never decoded here: training and model selection
        # see train and val only; evaluate/verify report on test.
        tr, va, te = stratified_split(samples.labels, cfg.val_fraction, cfg.seed, cfg.test_fraction)
        if not tr or not va:
            raise ValueError(f"{samples.root}: too few images to split ({len(samples.paths)})")
        if dist.main:
            save_split(split_path, samples, tr, va, cfg.seed, cfg.val_fraction, te, cfg.test_fraction)
        pick = lambda idx: Samples(samples.root, [samples.paths[i] for i in idx],  # noqa: E731
                                   [samples.labels[i] for i in idx], samples.classes)
        train_s, val_s = pick(tr), pick(va)
    log.info("dataset %s: %d images, %d classes: %s", samples.root, len(samples.paths), len(samples.classes),
             ", ".join(f"{k}={v}" for k, v in samples.counts().items()))
    prep = preprocessing_of(cfg)
    t0 = time.time()
    train_c = decode_once(dist, run_dir, lambda: ImageCache.build(train_s, prep, cfg.workers,
                                                                  source_scale(AUGMENTS[cfg.augment])))
    val_c = ImageCache.build(val_s, prep, cfg.workers) if dist.main else None
    skipped = train_c.skipped + (val_c.skipped if val_c is not None else [])
    log.info("decoded %d train + %d val images at %d px in %.1fs; %d unreadable skipped",
             len(train_c), len(val_c) if val_c is not None else 0, cfg.image_size, time.time() - t0, len(skipped))
    if skipped and dist.main:
        (run_dir / "skipped_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
    return train_c, val_c, samples


def preprocessing_of(cfg: TrainConfig) -> Preprocessing:
    from train.config import CROPS

    return Preprocessing(cfg.image_size, mean=cfg.mean, std=cfg.std, input_norm=cfg.input_norm,
                         resize=CROPS[cfg.crop], cell_fill=cfg.cell_fill,
                         cell_min_side=cfg.cell_min_side, cell_max_side=cfg.cell_max_side)


def to_tensor_nchw(images: np.ndarray) -> torch.Tensor:
    """[N, S, S, 3] uint8 -> [N, 3, S, S] uint8 (a view; batches are gathered from it)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_logits(model: torch.nn.Module, images_u8: torch.Tensor, device: torch.device, batch: int = 128,
                   channels_last: bool = False) -> torch.Tensor:
    """[N, 3, S, S] uint8 -> [N, C] float32 logits (eval mode, no augmentation)."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i:i + batch].to(device).float().div_(255)  # [B, 3, S, S] float32 in 0..1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())  # stays on the device: one copy to the host at the end, not one per batch
    return torch.cat(out).cpu() if out else torch.zeros(0)


# ----------------------------------------------------------------------------- the loop

def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in METRIC_FIELDS})
    atomic_write_text(path, buf.getvalue())


def fit(cfg: TrainConfig) -> dict:
    """Train per cfg; returns the best validation metrics. Writes everything into cfg.run_dir."""
    dist = init_distributed("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    device = pick_device(cfg, dist)  # binds this rank's GPU before any barrier
    run_dir = Path(cfg.run_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it "
                                  f"or choose another RUN name")
    barrier(dist)
    setup_logging(run_dir, dist.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN times its algorithms once and keeps the best
    precision = choose_precision(device.type, cfg.amp, cfg.amp_dtype, cuda_capability(device))
    use_compile = resolve_compile(cfg.compile, device.type)
    log.info("preset=%s arch=%s size=%d batch=%d epochs=%d lr=%g device=%s world=%d threads=%d precision=%s "
             "compile=%s", cfg.preset, cfg.arch, cfg.image_size, cfg.batch_size, cfg.epochs, cfg.lr, device,
             dist.world_size, torch.get_num_threads(), precision.name, "on" if use_compile else "off")
    if dist.main and not cfg.resume:  # a resumed run's config is saved only once it is known to match last.pt
        cfg.save(run_dir / "config.yaml")

    train_c, val_c, samples = prepare_data(cfg, run_dir, dist)
    classes = train_c.classes
    prep = preprocessing_of(cfg)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, len(classes), cfg.mean, cfg.std, cfg.input_norm, cfg.drop_path).to(device)
    # channels_last is ~1.5x faster for MobileViT's convolutions on x86 CPUs too (measured: benchmarks/train_speed.py)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info("%s: %.2fM parameters, %d classes", cfg.arch, count_params(model) / 1e6, len(classes))
    if cfg.mixstyle > 0:
        from train.mixstyle import attach_mixstyle

        attach_mixstyle(model, cfg.arch, cfg.mixstyle)  # training-mode hooks; checkpoints and exports never see them
    # After the model: what is left of the GPU's memory decides whether the images live there.
    batches = TrainBatches(train_c.images, train_c.labels, train_c.sources, device)
    val_x = val_y = None
    if val_c is not None:
        val_x, val_y = to_tensor_nchw(val_c.images), val_c.labels  # [N, 3, S, S] uint8, [N] int64
        if batches.resident:
            val_x = val_x.to(device)  # a tenth of what already fitted
    ema = None
    if cfg.ema_decay > 0:
        ema = ModelEma(model, cfg.ema_decay)
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    optimizer = make_optimizer(model, cfg, fused=on_gpu and cfg.optimizer in ("adamw", "adam"))
    sampler = make_sampler(train_c.labels, dist.rank, dist.world_size, cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup_steps, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    train_step = TrainStep(train_model, optimizer, scaler, precision, device, compile=use_compile,
                           static_batch=cfg.batch_size, label_smoothing=cfg.label_smoothing, check_now=not on_gpu,
                           compile_setting=cfg.compile, grad_clip=cfg.grad_clip)
    sync_every = SYNC_EVERY_CUDA if on_gpu else 1
    augment = AUGMENTS[cfg.augment]

    start_epoch, best_f1, rows = 1, -1.0, []
    if cfg.resume:
        last = run_dir / "last.pt"
        if not last.exists():
            raise CheckpointError(f"--resume: no {last} to resume from")
        ck = load_checkpoint(last)
        if ck["arch"] != cfg.arch or list(ck["classes"]) != classes:
            raise CheckpointError(f"{last}: was {ck['arch']} on {ck['classes']}, this run is {cfg.arch} on {classes}")
        diff = resume_mismatch(ck.get("config") or {}, cfg)
        if ck.get("dataset_fingerprint") not in (None, samples.fingerprint()):
            diff["data fingerprint"] = (ck["dataset_fingerprint"][:12], samples.fingerprint()[:12])
        if diff:
            raise CheckpointError(
                f"{last} cannot be resumed with this config: " + "; ".join(f"{k} was {a!r}, now {b!r}"
                                                                            for k, (a, b) in diff.items())
                + f". Start over with another RUN name (or delete {run_dir}); only --epochs may change, to extend it.")
        if dist.main:
            cfg.save(run_dir / "config.yaml")
        model.load_state_dict(ck["model_raw"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        if scaler.is_enabled():
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])  # the loss scale it had found, so the steps after resume match
                restored = scaler.state_dict()
                log.info("GradScaler restored: scale %g, growth tracker %d", restored["scale"],
                         restored["_growth_tracker"])
            else:
                log.warning("%s has no GradScaler state (trained in bf16/fp32 or before it was saved): the fp16 "
                            "loss scale starts afresh", last)
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        start_epoch, best_f1 = ck["epoch"] + 1, ck["best_macro_f1"]
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] < ck["epoch"]]
        rows.append({k: ck["metrics"][k] for k in METRIC_FIELDS})
        log.info("resumed from %s at epoch %d (best macro-F1 so far %.4f)", last, ck["epoch"], best_f1)

    fingerprint = samples.fingerprint()
    class_map = ClassMap.load(cfg.class_map).to_dict() if cfg.class_map else None
    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    t_start = time.time()
    best: dict = {}
    # Checkpoints, metrics.csv and plots are written on a thread while the next epoch trains (rank 0 only).
    writer = BackgroundWriter() if dist.main else None
    finished = False
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            # Seed per epoch: an interrupted run resumed at epoch e draws the same batches as an unbroken one
            # (torch.manual_seed seeds the CUDA generators too, which the augmentations draw from on a GPU).
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            if isinstance(sampler, DistributedBalancedSampler):
                sampler.set_epoch(epoch)
            order = batches.epoch_order(torch.as_tensor(list(iter(sampler)), dtype=torch.long))  # [M] int64
            train_model.train()
            t0 = time.time()
            meter = EpochMeter(device)
            bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", dist.main)
            for step in range(steps_per_epoch):
                lo = step * cfg.batch_size
                n = min(cfg.batch_size, len(order) - lo)
                if n <= 0:
                    break
                x, y, src = batches.batch(order, lo, n)  # [n, 3, S, S] float32 0..1, [n], [n, 3, kS, kS] or None
                x = augment_batch(x, src, augment, cfg.channels_last)
                target = y
                # soft targets [n, C]; the meter still counts agreement with each picture's own label, so with mixup
                # the training accuracy reads lower than the model is (half the blends are mostly the other cell)
                if cfg.mixup > 0:
                    x, target = mixup_batch(x, y, len(classes), cfg.mixup)
                loss, logits = train_step(x, target, where=f"epoch {epoch} step {step}")
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                meter.add(loss, logits, y)
                if (step + 1) % sync_every == 0:  # the only reads of device values inside the epoch
                    _check_and_show(meter, bar, epoch, step, t0)
                if bar is not None:
                    bar.update(1)
            train_loss, train_acc, _ = _check_and_show(meter, None, epoch, steps_per_epoch - 1, t0)
            if bar is not None:
                bar.close()
            train_s = time.time() - t0  # after the read above, which waited for the last step on a GPU
            seen = meter.seen
            barrier(dist)
            if not dist.main:
                continue

            eval_model = ema.module if ema is not None else model
            logits = predict_logits(eval_model, val_x, device, channels_last=cfg.channels_last)
            val_loss = F.cross_entropy(logits, torch.from_numpy(val_y)).item()
            rep = report(val_y, logits.argmax(1).numpy(), classes)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": rep["accuracy"], "val_balanced_acc": rep["balanced_accuracy"],
                   "val_macro_f1": rep["macro_f1"], "lr": optimizer.param_groups[0]["lr"],
                   "epoch_s": time.time() - t0, "train_images_per_s": seen * dist.world_size / max(train_s, 1e-9),
                   "elapsed_s": elapsed0 + time.time() - t_start}
            rows.append(row)
            improved = rep["macro_f1"] > best_f1
            if improved:
                best_f1 = rep["macro_f1"]
                best = row
            # Copies taken now (to the CPU): the writer thread saves them while the next epoch changes the weights.
            model_sd = snapshot(model.state_dict())
            ckpt = {
                "format_version": CHECKPOINT_VERSION, "arch": cfg.arch, "classes": classes,
                "preprocessing": prep.to_dict(), "config": cfg.to_dict(), "class_map": class_map,
                "dataset_fingerprint": fingerprint, "epoch": epoch, "metrics": {**row, "report": rep},
                # what evaluation/export use (the EMA weights when enabled)
                "model": model_sd if ema is None else snapshot(ema.module.state_dict()),
            }
            last_ckpt = {**ckpt, "model_raw": model_sd, "optimizer": snapshot(optimizer.state_dict()),
                         "scheduler": snapshot(scheduler.state_dict()),
                         "ema": snapshot(ema.state_dict()) if ema is not None else None,
                         "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                         "best_macro_f1": best_f1,
                         "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
            confusion = None
            if improved and cfg.plots:
                confusion = (rep["confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                             f"{cfg.arch} validation, epoch {epoch} (acc {rep['accuracy']:.3f})")
            writer.submit(write_epoch, run_dir, ckpt if improved else None, last_ckpt, list(rows), cfg.plots,
                          confusion)
            memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                      if on_gpu else "")
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f bal-acc %.4f macro-F1 %.4f%s | "
                     "%.0f img/s, %.1fs%s", epoch, cfg.epochs, row["train_loss"], row["train_acc"], val_loss,
                     rep["accuracy"], rep["balanced_accuracy"], rep["macro_f1"], "  *best*" if improved else "",
                     row["train_images_per_s"], row["epoch_s"], memory)
        finished = True
    finally:
        if writer is not None:
            try:
                writer.close()  # the last epoch's files are on disk before fit returns (or raises)
            except RuntimeError:
                if finished:
                    raise
                log.exception("writing the last checkpoint failed too")

    if dist.main:
        final = load_checkpoint(run_dir / "best.pt")
        log.info("best epoch %d:\n%s", final["epoch"], format_report(final["metrics"]["report"]))
        best = {k: v for k, v in final["metrics"].items() if k != "report"}
    if dist.world_size > 1:
        barrier(dist)
        torch.distributed.destroy_process_group()
    return best


def write_epoch(run_dir: Path, best_ckpt: dict | None, last_ckpt: dict, rows: list[dict], plot: bool,
                confusion: tuple | None) -> None:
    """One epoch's files (on the writer thread), each atomic, in an order a kill may interrupt anywhere:
    best.pt, last.pt, then metrics.csv (resume rebuilds a row it lacks from last.pt), then the plots."""
    if best_ckpt is not None:
        save_atomic(best_ckpt, run_dir / "best.pt")
    save_atomic(last_ckpt, run_dir / "last.pt")
    write_metrics(run_dir / "metrics.csv", rows)
    if plot:
        if confusion is not None:
            plots.plot_confusion(*confusion)
        plots.plot_curves(rows, run_dir)


def _check_and_show(meter: EpochMeter, bar, epoch: int, step: int, t0: float) -> tuple[float, float, int]:
    """Read the epoch's running loss/accuracy (a host sync on a GPU), stop on a non-finite loss, show progress."""
    loss, acc, bad = meter.read()
    if bad:
        raise FloatingPointError(f"loss became non-finite ({bad} step(s)) in epoch {epoch} by step {step}; "
                                 f"lower --lr")
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{meter.seen / (time.time() - t0):.0f}",
                        refresh=False)
    return loss, acc, bad


class ModelEma(torch.nn.Module):
    """Exponential moving average of weights and buffers, with timm's warm-up of the decay.

    decay_t = min(decay, (1 + t) / (10 + t)): early on the average follows the model closely,
    so a short run isn't judged on weights still dominated by the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        import copy

        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        t = float(self.updates)
        d = min(self.decay, (1 + t) / (10 + t))
        ema_sd = self.module.state_dict()
        for k, v in model.state_dict().items():
            e = ema_sd[k]
            if v.dtype.is_floating_point:
                e.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                e.copy_(v)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # tqdm hides itself when stderr is not a terminal (CI logs); the epoch summary line is always logged.
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None, file=sys.stderr)
