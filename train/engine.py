"""The training loop: data once into RAM, balanced batches, augment on device, validate, checkpoint, resume."""
from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train import plots
from train.augment import AUGMENTS, source_scale
from train.checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_atomic
from train.config import TrainConfig, resume_mismatch
from train.data import ClassMap, ImageCache, Samples, load_split_samples, save_split, scan_dataset, stratified_split
from train.metrics import format_report, report
from train.models import count_params, create_model
from train.preprocess import Preprocessing
from train.sampler import DistributedBalancedSampler, make_sampler

log = logging.getLogger("train")

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "val_macro_f1",
                 "lr", "epoch_s", "train_images_per_s", "elapsed_s"]


# ----------------------------------------------------------------------------- set-up helpers

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws == 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Dist(torch.distributed.get_rank(), ws, int(os.environ.get("LOCAL_RANK", "0")))


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D parameters): standard for ViTs and CNNs alike.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ----------------------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig, run_dir: Path, dist: Dist) -> tuple[ImageCache, ImageCache, Samples]:
    """Scan, split (or reuse the saved split when resuming) and decode both halves into RAM."""
    class_map = ClassMap.load(cfg.class_map or None)
    samples = scan_dataset(cfg.data, class_map, seed=cfg.seed)
    split_path = run_dir / "split.json"
    if cfg.resume and split_path.exists():
        train_s = load_split_samples(split_path, "train", samples.root)
        val_s = load_split_samples(split_path, "val", samples.root)
        if train_s.classes != samples.classes:
            raise CheckpointError(f"{split_path}: classes {train_s.classes} differ from the data's {samples.classes}")
    else:
        tr, va = stratified_split(samples.labels, cfg.val_fraction, cfg.seed)
        if not tr or not va:
            raise ValueError(f"{samples.root}: too few images to split ({len(samples.paths)})")
        if dist.main:
            save_split(split_path, samples, tr, va, cfg.seed, cfg.val_fraction)
        pick = lambda idx: Samples(samples.root, [samples.paths[i] for i in idx],  # noqa: E731
                                   [samples.labels[i] for i in idx], samples.classes)
        train_s, val_s = pick(tr), pick(va)
    log.info("dataset %s: %d images, %d classes: %s", samples.root, len(samples.paths), len(samples.classes),
             ", ".join(f"{k}={v}" for k, v in samples.counts().items()))
    prep = preprocessing_of(cfg)
    t0 = time.time()
    train_c = ImageCache.build(train_s, prep, cfg.workers, source_scale(AUGMENTS[cfg.augment]))
    val_c = ImageCache.build(val_s, prep, cfg.workers)
    skipped = train_c.skipped + val_c.skipped
    log.info("decoded %d train + %d val images at %d px in %.1fs; %d unreadable skipped",
             len(train_c), len(val_c), cfg.image_size, time.time() - t0, len(skipped))
    if skipped and dist.main:
        (run_dir / "skipped_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
    return train_c, val_c, samples


def preprocessing_of(cfg: TrainConfig) -> Preprocessing:
    from train.config import CROPS

    return Preprocessing(cfg.image_size, mean=cfg.mean, std=cfg.std, input_norm=cfg.input_norm,
                         resize=CROPS[cfg.crop], cell_fill=cfg.cell_fill)


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
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- the loop

def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in METRIC_FIELDS})
    os.replace(tmp, path)


def fit(cfg: TrainConfig) -> dict:
    """Train per cfg; returns the best validation metrics. Writes everything into cfg.run_dir."""
    dist = init_distributed("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    run_dir = Path(cfg.run_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it "
                                  f"or choose another RUN name")
    if dist.world_size > 1:
        torch.distributed.barrier()
    setup_logging(run_dir, dist.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg, dist)
    on_gpu = device.type == "cuda"
    log.info("preset=%s arch=%s size=%d batch=%d epochs=%d lr=%g device=%s world=%d threads=%d",
             cfg.preset, cfg.arch, cfg.image_size, cfg.batch_size, cfg.epochs, cfg.lr, device, dist.world_size,
             torch.get_num_threads())
    if dist.main:
        cfg.save(run_dir / "config.yaml")

    train_c, val_c, samples = prepare_data(cfg, run_dir, dist)
    classes = train_c.classes
    prep = preprocessing_of(cfg)
    train_x, train_y = to_tensor_nchw(train_c.images), torch.from_numpy(train_c.labels)
    train_src = to_tensor_nchw(train_c.sources) if train_c.sources is not None else None  # [N, 3, kS, kS] uint8
    val_x, val_y = to_tensor_nchw(val_c.images), val_c.labels

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, len(classes), cfg.mean, cfg.std, cfg.input_norm).to(device)
    # channels_last is ~1.5x faster for MobileViT's convolutions on x86 CPUs too (measured: benchmarks/train_speed.py)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info("%s: %.2fM parameters, %d classes", cfg.arch, count_params(model) / 1e6, len(classes))
    ema = None
    if cfg.ema_decay > 0:
        ema = ModelEma(model, cfg.ema_decay)
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    optimizer = make_optimizer(model, cfg)
    sampler = make_sampler(train_c.labels, dist.rank, dist.world_size, cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup_steps, cfg))
    use_amp = cfg.amp and on_gpu
    amp_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
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
        model.load_state_dict(ck["model_raw"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        start_epoch, best_f1 = ck["epoch"] + 1, ck["best_macro_f1"]
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] < ck["epoch"]]
        rows.append({k: ck["metrics"][k] for k in METRIC_FIELDS})
        log.info("resumed from %s at epoch %d (best macro-F1 so far %.4f)", last, ck["epoch"], best_f1)

    fingerprint = samples.fingerprint()
    elapsed0 = rows[-1]["elapsed_s"] if rows else 0.0
    t_start = time.time()
    best: dict = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        # Seed per epoch: an interrupted run resumed at epoch e draws the same batches as an unbroken one.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        if isinstance(sampler, DistributedBalancedSampler):
            sampler.set_epoch(epoch)
        order = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
        train_model.train()
        t0 = time.time()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", dist.main)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) == 0:
                break
            x = train_x[idx].to(device, non_blocking=True).float().div_(255)  # [B, 3, S, S] float32 in 0..1
            y = train_y[idx].to(device, non_blocking=True)
            if train_src is not None:
                src = train_src[idx].to(device, non_blocking=True).float().div_(255)  # [B, 3, kS, kS] in 0..1
                x = augment(x, src)
            elif augment is not None:
                x = augment(x)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = train_model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            n = len(idx)
            seen += n
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == y).sum().item()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen / (time.time() - t0):.0f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        train_s = time.time() - t0
        if dist.world_size > 1:
            torch.distributed.barrier()
        if not dist.main:
            continue

        eval_model = ema.module if ema is not None else model
        logits = predict_logits(eval_model, val_x, device, channels_last=cfg.channels_last)
        val_loss = F.cross_entropy(logits, torch.from_numpy(val_y)).item()
        rep = report(val_y, logits.argmax(1).numpy(), classes)
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val_loss, "val_acc": rep["accuracy"], "val_balanced_acc": rep["balanced_accuracy"],
               "val_macro_f1": rep["macro_f1"], "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.time() - t0,
               "train_images_per_s": seen * dist.world_size / max(train_s, 1e-9),
               "elapsed_s": elapsed0 + time.time() - t_start}
        rows.append(row)
        ckpt = {
            "format_version": CHECKPOINT_VERSION, "arch": cfg.arch, "classes": classes,
            "preprocessing": prep.to_dict(), "config": cfg.to_dict(),
            "class_map": (ClassMap.load(cfg.class_map).to_dict() if cfg.class_map else None),
            "dataset_fingerprint": fingerprint, "epoch": epoch, "metrics": {**row, "report": rep},
            "model": eval_model.state_dict(),  # what evaluation/export use (the EMA weights when enabled)
        }
        improved = rep["macro_f1"] > best_f1
        if improved:
            best_f1 = rep["macro_f1"]
            save_atomic(ckpt, run_dir / "best.pt")
            best = row
            if cfg.plots:
                plots.plot_confusion(rep["confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                                     f"{cfg.arch} validation, epoch {epoch} (acc {rep['accuracy']:.3f})")
        ckpt.update({"model_raw": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "best_macro_f1": best_f1,
                     "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}})
        save_atomic(ckpt, run_dir / "last.pt")
        # After last.pt: a kill in between loses no row (resume rebuilds it from the checkpoint).
        write_metrics(run_dir / "metrics.csv", rows)
        if cfg.plots:
            plots.plot_curves(rows, run_dir)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f bal-acc %.4f macro-F1 %.4f%s | "
                 "%.0f img/s, %.1fs", epoch, cfg.epochs, row["train_loss"], row["train_acc"], val_loss,
                 rep["accuracy"], rep["balanced_accuracy"], rep["macro_f1"], "  *best*" if improved else "",
                 row["train_images_per_s"], row["epoch_s"])

    if dist.main:
        final = load_checkpoint(run_dir / "best.pt")
        log.info("best epoch %d:\n%s", final["epoch"], format_report(final["metrics"]["report"]))
        best = {k: v for k, v in final["metrics"].items() if k != "report"}
    if dist.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return best


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
