"""`python -m train.finetune`: adapt a trained checkpoint to a new lab's pictures from a few labelled cells.

A lab's own scanner, camera and stain differ from the training lab's (see README "Cells from other
labs"); a few labelled cells of its own fix most of that. This starts from a run's best.pt, maps the
new folder's classes onto the checkpoint's (by name, or through --class-map; a class the checkpoint
does not know gets a new output), trains the whole network briefly, and writes an ordinary run
folder (best.pt, config.yaml, split.json, finetune.json), so `make export` and `make verify` work on
it as on any run.

With --shots K the folder is split as in the benchmark: K random images per class to train on (all
of a class that has K or fewer), the rest held out and reported; nothing is selected on the held-out
images (the final epoch is kept). Without --shots, a stratified 80/20 split.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("train")


@dataclass
class FinetuneConfig:
    from_run: str = ""          # a run folder (its best.pt) or a checkpoint file
    data: str = ""              # the new lab's labelled folder (class folders) or .zip
    run_dir: str = ""           # output run folder
    class_map: str = ""         # map the folder names onto the checkpoint's classes (train/classmaps)
    shots: int = 0              # >0: train on K images per class, hold out the rest
    val_fraction: float = 0.2   # shots == 0: held-out share per class
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3            # half the from-scratch rate, no warm-up: the features are kept, the stain is learnt
    weight_decay: float = 0.01
    augment: str = "dihedral"   # lossless: a few real cells of the new lab need no simulated other labs
    seed: int = 0
    threads: int = 0
    image_size: int = 0         # >0: fine-tune (and export) at exactly this input size
    # otherwise at the parent's size but no less than this, once the median class has `upsize_min_per_class`
    # training images: a lab's own labelled cells carry detail that a small input chosen for transfer without labels
    # drops. From the three 48 px crosslab runs, 96 px was +1.9 points at K = 10 over 30 paired draws of
    # crosslab_dev and +0.7 at K = 20 (10 draws); 0: always the parent's size
    min_image_size: int = 96
    # ... but with fewer cells per class the larger input fits their spurious detail: at K = 5, 96 px (and 64 px)
    # lost 3-4 points on average to 48 px, one draw in ten falling to 63% (48 px: 86-90% on every draw). README.
    upsize_min_per_class: int = 10
    soup: int = 1               # >1: train this many times from the parent (other draw orders) and average the weights
    tta: str = "none"           # held-out evaluation with the test-time augmentation `export --tta` will put in the graph
    panel: str = ""             # also report the held-out accuracy on this cellcore.panels panel (as the app applies it)
    # >0: first train only the classifier layer this many epochs (the network frozen), then everything: "LP-FT"
    # (Kumar et al. 2022), so the whole network is not first pulled by a head that fits PBC's classes
    head_epochs: int = 0
    head_lr: float = 1e-2       # the classifier layer alone: a linear model, so a larger rate
    # >0: mixup's Beta(alpha, alpha) (train.step.mixup_batch) in the whole-network phase: with a few dozen cells,
    # blends of them are more pictures to fit than the shots alone, and fewer of a draw's quirks to memorise. On
    # crosslab_dev (session 16, README "Adapting to a new lab"), 50 paired draws: K = 10 from the three 48 px crosslab
    # runs +0.9, +1.2, +0.1 points, K = 5 +1.0, K = 20 +0.5 (30 up, 4 level, 16 down); 0: off
    mixup: float = 0.2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.splitlines()[0].split(": ", 1)[1])
    d = FinetuneConfig()
    p.add_argument("--from", dest="from_run", required=True, help="trained run folder or checkpoint (best.pt)")
    p.add_argument("--data", required=True, help="the new lab's labelled folder of class folders (or .zip)")
    p.add_argument("--run-dir", required=True, help="output run folder (runs/<name>)")
    p.add_argument("--class-map", default="", help="YAML/JSON class map onto the checkpoint's classes")
    p.add_argument("--shots", type=int, default=d.shots, help="images per class to train on; the rest are held "
                   "out (default 0: a stratified split with --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help=f"default {d.val_fraction}")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--augment", default=d.augment, help=f"default {d.augment} (train.augment.AUGMENTS)")
    p.add_argument("--seed", type=int, default=d.seed, help="which random images are the shots (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--min-image-size", type=int, default=d.min_image_size, help="without --image-size, fine-tune "
                   f"at the parent's input size but at least this (default {d.min_image_size}; 0: the parent's) ...")
    p.add_argument("--upsize-min-per-class", type=int, default=d.upsize_min_per_class, help="... when the median "
                   f"class has at least this many training images (default {d.upsize_min_per_class})")
    p.add_argument("--image-size", type=int, default=d.image_size, help="input size in px for the fine-tuned "
                   "model (default 0: the parent's); MobileViT has no position embeddings, so its weights carry over")
    p.add_argument("--soup", type=int, default=d.soup, help="train this many times from the parent with other "
                   f"draw orders and average the weights (default {d.soup}: once)")
    p.add_argument("--tta", default=d.tta, choices=("none", "dihedral8"),
                   help="evaluate the held-out images as `python -m export --tta` will run them (default none)")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="first train only the classifier layer "
                   f"this many epochs, then the whole network --epochs (LP-FT; default {d.head_epochs}: off)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help=f"learning rate of that phase (default {d.head_lr})")
    p.add_argument("--mixup", type=float, default=d.mixup, help="mixup's Beta alpha while the whole network trains "
                   f"(default {d.mixup}: off)")
    p.add_argument("--panel", default=d.panel, help="also report the held-out accuracy on this panel, as the app "
                   "answers when a lab picks it (wbc5, wbc6 or a class list; default: none)")
    return p


def finetune_size(cfg: FinetuneConfig, parent: int, per_class: float) -> int:
    """The input size in px a fine-tune trains and exports at, for a parent trained at `parent` px and a training
    set whose median class has `per_class` images."""
    if cfg.image_size:
        return cfg.image_size
    return max(parent, cfg.min_image_size) if per_class >= cfg.upsize_min_per_class else parent


def median_per_class(labels: list[int]) -> float:
    """Median number of images over the classes present in `labels`."""
    return float(np.median(np.unique(labels, return_counts=True)[1])) if len(labels) else 0.0


def shot_split(labels: list[int], shots: int, seed: int) -> tuple[list[int], list[int]]:
    """K random indices per class to train on (all of a class with <= K), the rest held out."""
    train_idx, held = [], []
    arr = np.asarray(labels)
    for c in np.unique(arr):
        idx = np.flatnonzero(arr == c).tolist()
        random.Random(seed * 7919 + int(c)).shuffle(idx)
        train_idx += idx[:shots]
        held += idx[shots:]
    return sorted(train_idx), sorted(held)


def widen_head(model, old: int, new: int) -> None:
    """Give the classifier `new` outputs, keeping the first `old` rows' weights (new rows start small)."""
    import torch
    from torch import nn

    last = None
    for name, mod in model.backbone.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == old:
            last = (name, mod)
    if last is None:
        raise ValueError(f"cannot find the {old}-output classifier layer to widen")
    name, lin = last
    wide = nn.Linear(lin.in_features, new, bias=lin.bias is not None)
    with torch.no_grad():
        wide.weight.mul_(0.1)
        wide.weight[:old] = lin.weight
        if lin.bias is not None:
            wide.bias.zero_()
            wide.bias[:old] = lin.bias
    parent = model.backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.backbone
    setattr(parent, name.rsplit(".", 1)[-1], wide)


def parent_stain_hue(ckpt: dict, ckpt_path: Path) -> tuple[float, float, float, float] | None:
    """The stain colour range the parent model was trusted on (cellcore.quality.PictureChecks.stain_hue).

    From the parent checkpoint (itself fine-tuned), else its export's manifest (what its exported files
    flag), else fitted on its training split; None if none of these exists.
    """
    from cellcore.quality import stain_hue_range
    from train.data import DatasetError, load_split_samples

    if ckpt.get("stain_hue"):
        return tuple(ckpt["stain_hue"])
    manifest = ckpt_path.parent / "export" / "manifest.json"
    if manifest.is_file():
        hue = json.loads(manifest.read_text()).get("uncertainty", {}).get("picture_checks", {}).get("stain_hue")
        if hue:
            return tuple(hue)
    split = ckpt_path.parent / "split.json"
    if not split.is_file():
        log.warning("%s: no split.json beside it, so the new run's stain colour range is the new lab's alone", ckpt_path)
        return None
    try:
        train_s = load_split_samples(split, "train")
    except DatasetError as exc:
        log.warning("the parent's training photos are not readable (%s): the stain colour range is the new lab's alone",
                    exc)
        return None
    return stain_hue_range([Path(train_s.root) / p for p in train_s.paths])


def average_weights(state_dicts: list[dict]) -> dict:
    """The element-wise mean of floating-point tensors (in float64, cast back); other entries from the first."""
    out = {}
    for k, v in state_dicts[0].items():
        if v.is_floating_point():
            out[k] = (sum(sd[k].double() for sd in state_dicts) / len(state_dicts)).to(v.dtype)
        else:
            out[k] = v.clone()  # BatchNorm's num_batches_tracked: a counter, the same in every ingredient
    return out


def train_steps(model, x_all, y_all, src_all, w, augment, smoothing: float, cfg: FinetuneConfig, seed: int,
                head_only: bool = False) -> None:
    """cfg.epochs of class-balanced draws (weights `w`) from the cached shots, AdamW with a cosine decay; with
    `head_only`, cfg.head_epochs at cfg.head_lr of the classifier layer alone (the rest frozen, in eval mode).

    x_all: [N, 3, S, S] uint8 (the preprocessed shots); src_all: the larger sources some augments crop from.
    """
    import torch
    import torch.nn.functional as F

    from train.step import mixup_batch

    epochs, lr = (cfg.head_epochs, cfg.head_lr) if head_only else (cfg.epochs, cfg.lr)
    steps_per_epoch = max(1, math.ceil(len(y_all) / cfg.batch_size))
    total = steps_per_epoch * epochs
    params = list(model.backbone.get_classifier().parameters()) if head_only else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(not head_only)
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    torch.manual_seed(seed)  # dropout and any other global draws: each call reproducible on its own
    gen = torch.Generator().manual_seed(seed)
    model.train(not head_only)  # head only: BatchNorm statistics and dropout as the frozen network's
    for epoch in range(1, epochs + 1):
        idx = torch.multinomial(w, steps_per_epoch * cfg.batch_size, replacement=True, generator=gen)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            b = idx[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = x_all[b].float().div_(255)  # [B, 3, S, S] float32 in 0..1
            if src_all is not None:
                x = augment(x, src_all[b].float().div_(255), generator=gen)
            elif augment is not None:
                x = augment(x, generator=gen)
            x, target = x.contiguous(memory_format=torch.channels_last), y_all[b]
            if cfg.mixup > 0 and not head_only:  # [B, C] soft targets; drawn from the seeded global generator
                x, target = mixup_batch(x, target, model.backbone.get_classifier().out_features, cfg.mixup)
            loss = F.cross_entropy(model(x), target, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        log.info("finetune %sepoch %d/%d  train loss %.4f", "head " * head_only, epoch, epochs,
                 loss_sum / steps_per_epoch)
    for p in model.parameters():
        p.requires_grad_(True)


def finetune(cfg: FinetuneConfig) -> dict:
    import torch

    from cellcore.quality import stain_hue_range, union_stain_hue
    from train.augment import AUGMENTS, source_scale
    from train.checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, model_from_checkpoint, save_atomic
    from train.data import ClassMap, DatasetError, ImageCache, Samples, atomic_write_text, save_split, scan_dataset
    from train.engine import predict_logits, setup_logging, to_tensor_nchw
    from train.metrics import format_report, report
    from train.models import check_tta

    t_start = time.time()
    if cfg.mixup < 0:
        raise ValueError(f"--mixup {cfg.mixup}: a Beta distribution's alpha, >= 0 (0: off)")
    if cfg.head_epochs < 0 or cfg.head_lr <= 0:
        raise ValueError(f"--head-epochs {cfg.head_epochs} / --head-lr {cfg.head_lr}: need epochs >= 0 and a rate > 0")
    run_dir = Path(cfg.run_dir)
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run (best.pt); choose another RUN name")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    src = Path(cfg.from_run)
    ckpt_path = src / "best.pt" if src.is_dir() else src
    ckpt = load_checkpoint(ckpt_path)
    model, prep, classes = model_from_checkpoint(ckpt, ckpt_path)
    base_cfg = dict(ckpt.get("config") or {})

    samples = scan_dataset(cfg.data, ClassMap.load(cfg.class_map or None), seed=cfg.seed)
    new = [c for c in samples.classes if c not in classes]
    all_classes = classes + new
    from cellcore.panels import resolve_panel

    on_panel = resolve_panel(cfg.panel, all_classes)  # PanelError (a ValueError) before any training
    if new:
        log.info("classes the checkpoint does not know get new outputs: %s", ", ".join(new))
        widen_head(model, len(classes), len(all_classes))
    missing = [c for c in classes if c not in samples.classes]
    if missing:
        log.info("%s has no images of %s: those outputs are kept but not trained further", cfg.data, ", ".join(missing))
    labels = [all_classes.index(samples.classes[i]) for i in samples.labels]
    samples = Samples(samples.root, samples.paths, labels, all_classes)
    if cfg.shots > 0:
        tr, va = shot_split(labels, cfg.shots, cfg.seed)
    else:
        from train.data import stratified_split

        tr, va, _ = stratified_split(labels, cfg.val_fraction, cfg.seed)
    if not tr:
        raise DatasetError(f"{cfg.data}: no images to fine-tune on")
    save_split(run_dir / "split.json", samples, tr, va, cfg.seed, cfg.val_fraction if cfg.shots <= 0 else 0.0)
    per_class = median_per_class([labels[i] for i in tr])
    size = finetune_size(cfg, prep.input_size, per_class)
    if size != prep.input_size:
        log.info("input size %d px -> %d px (the median class has %g training images)", prep.input_size, size,
                 per_class)
        prep = dataclasses.replace(prep, input_size=size)
        base_cfg["image_size"] = size
    elif not cfg.image_size and cfg.min_image_size > size:
        log.info("input size kept at the parent's %d px: the median class has %g training images, fewer than "
                 "--upsize-min-per-class %d", size, per_class, cfg.upsize_min_per_class)
    pick = lambda idx: Samples(samples.root, [samples.paths[i] for i in idx],  # noqa: E731
                               [samples.labels[i] for i in idx], all_classes)
    augment_name = cfg.augment or base_cfg.get("augment", "dihedral")
    if augment_name not in AUGMENTS:
        raise ValueError(f"unknown augment {augment_name!r}; valid: {', '.join(AUGMENTS)}")
    augment = AUGMENTS[augment_name]
    train_c = ImageCache.build(pick(tr), prep, 1, source_scale(augment))
    val_c = ImageCache.build(pick(va), prep, 1) if va else None
    log.info("fine-tuning %s (%s) on %d images of %s (%s); %d held out", ckpt_path, ckpt["arch"], len(train_c),
             cfg.data, ", ".join(f"{c}={int((train_c.labels == i).sum())}" for i, c in enumerate(all_classes)
                                 if (train_c.labels == i).any()), len(va))

    torch.manual_seed(cfg.seed)
    x_all, y_all = to_tensor_nchw(train_c.images), torch.from_numpy(train_c.labels)
    src_all = to_tensor_nchw(train_c.sources) if train_c.sources is not None else None
    # class-balanced draws: a new lab's few cells are as imbalanced as its slides
    w = torch.as_tensor(1.0 / np.bincount(train_c.labels, minlength=len(all_classes))[train_c.labels])
    smoothing = float(base_cfg.get("label_smoothing", 0.0))
    if cfg.head_epochs > 0:
        train_steps(model, x_all, y_all, src_all, w, augment, smoothing, cfg, cfg.seed, head_only=True)
    if cfg.soup <= 1:
        train_steps(model, x_all, y_all, src_all, w, augment, smoothing, cfg, cfg.seed)
    else:
        # a uniform "model soup": the same shots, different draw orders and augmentations, weights averaged;
        # all start from the parent's weights, so their average is a model of the same basin (Wortsman 2022)
        import copy

        start = copy.deepcopy(model.state_dict())
        ingredients = []
        for i in range(cfg.soup):
            model.load_state_dict(start)
            log.info("soup ingredient %d/%d", i + 1, cfg.soup)
            train_steps(model, x_all, y_all, src_all, w, augment, smoothing, cfg, cfg.seed * 1000 + i)
            ingredients.append(copy.deepcopy(model.state_dict()))
        model.load_state_dict(average_weights(ingredients))
    model.eval()
    model.tta = check_tta(cfg.tta)  # eval only: the checkpoint below holds the same weights either way
    rep, acc_panel = None, None
    if val_c is not None and len(val_c):
        logits = predict_logits(model, to_tensor_nchw(val_c.images), torch.device("cpu"))  # [N, C]
        rep = report(val_c.labels, logits.argmax(1).numpy(), all_classes)
        log.info("held-out (%d images):\n%s", len(val_c), format_report(rep))
        if on_panel is not None:  # the app's answer on the panel: the most probable of its classes
            z = logits.numpy()
            masked = np.where(np.isin(np.arange(z.shape[1]), on_panel), z, -np.inf)
            acc_panel = float((masked.argmax(1) == np.asarray(val_c.labels)).mean())
            log.info("held-out accuracy on the %s panel: %.4f", cfg.panel, acc_panel)
    stain_hue = union_stain_hue(parent_stain_hue(ckpt, ckpt_path),
                                stain_hue_range([Path(samples.root) / samples.paths[i] for i in tr]))
    wall = time.time() - t_start
    base_cfg.update(data=str(cfg.data), run_dir=str(run_dir), class_map=cfg.class_map or "", augment=augment_name)
    metrics = {"epoch": cfg.epochs, "val_acc": rep["accuracy"] if rep else float("nan"),
               "val_macro_f1": rep["macro_f1"] if rep else float("nan"), "report": rep}
    save_atomic({"format_version": CHECKPOINT_VERSION, "arch": ckpt["arch"], "classes": all_classes,
                 "preprocessing": prep.to_dict(), "config": base_cfg,
                 "class_map": ClassMap.load(cfg.class_map).to_dict() if cfg.class_map else None,
                 "dataset_fingerprint": samples.fingerprint(), "epoch": cfg.epochs, "metrics": metrics,
                 "model": model.state_dict(), "finetuned_from": str(ckpt_path), "stain_hue": stain_hue,
                 "finetune": dataclasses.asdict(cfg)}, run_dir / "best.pt")
    import yaml

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({**base_cfg, "finetune": dataclasses.asdict(cfg)},
                                                              sort_keys=False))
    result = {"from": str(ckpt_path), "shots": cfg.shots, "seed": cfg.seed, "train_images": len(train_c),
              "held_out_images": len(va), "wall_s": round(wall, 1), "held_out_accuracy": metrics["val_acc"],
              "held_out_macro_f1": metrics["val_macro_f1"], "classes": all_classes, "new_classes": new,
              "tta": cfg.tta, "panel": cfg.panel or None, "held_out_accuracy_panel": acc_panel,
              "image_size": size, "median_train_images_per_class": per_class}
    atomic_write_text(run_dir / "finetune.json", json.dumps(result, indent=1))
    log.info("fine-tuned in %.1f s -> %s (held-out accuracy %.4f)", wall, run_dir / "best.pt", metrics["val_acc"])
    return result


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DatasetError

    from train.engine import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(None)
    try:
        finetune(FinetuneConfig(**vars(args)))
    except (CheckpointError, DatasetError, FileExistsError, ValueError) as exc:  # incl. cellcore PanelError
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
