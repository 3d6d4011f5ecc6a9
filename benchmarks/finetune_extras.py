"""Two fine-tuning ideas measured against the plain K-shot fine-tune (not kept in train.finetune: neither helped).

python -m benchmarks.finetune_extras --from runs/odbg80 --data ../shared/data/crosslab_dev --mode selftrain
python -m benchmarks.finetune_extras --from runs/odbg80 --data ../shared/data/crosslab_dev --mode rehearse

Both start, for each seed, from the same K-shot split as `train.finetune --shots K --seed S` and the same
training steps (train.finetune.train_steps, its default settings), and evaluate with the dihedral TTA:

- selftrain: a lab has many unlabelled photos. Fine-tune on the shots, label the unlabelled photos with
  that model, keep those above --threshold and fine-tune again (from the parent) on shots + kept. So
  that no evaluated photo is ever trained on, even unlabelled, the held-out photos are split in two
  halves: each half is evaluated by the model whose unlabelled pool was the other half.
- rehearse: mix --per-class photos per class of the parent's own training split into the shots
  (--share of the draws), so the few new cells move the features less.

Prints one line per seed (the plain fine-tune's accuracy beside the idea's), the means, and the photos
the plain fine-tune gets wrong in most draws (the hard core of the lab's set); writes nothing. Seconds are not reported: this compares accuracy only.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import random
import statistics
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune_extras", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="from_run", required=True, help="trained run folder (best.pt, split.json)")
    p.add_argument("--data", required=True, help="the new lab's labelled folder of class folders")
    p.add_argument("--mode", required=True, choices=("selftrain", "rehearse"))
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=None, help="per fit (default: train.finetune's own, 40)")
    p.add_argument("--threshold", type=float, default=0.9, help="selftrain: keep pseudo-labels at least this sure")
    p.add_argument("--per-class", type=int, default=20, help="rehearse: parent training photos per class")
    p.add_argument("--share", type=float, default=0.5, help="rehearse: share of the draws from the parent's photos")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("train").setLevel(logging.WARNING)  # train_steps' per-epoch loss lines, 40 per fit
    import torch

    from train.augment import AUGMENTS
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import ClassMap, ImageCache, Samples, load_split_samples, scan_dataset
    from train.engine import predict_logits, to_tensor_nchw
    from train.finetune import FinetuneConfig, finetune_size, shot_split, train_steps
    from train.models import check_tta

    ckpt_path = Path(args.from_run) / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    model, prep, classes = model_from_checkpoint(ckpt, ckpt_path)
    parent = copy.deepcopy(model.state_dict())
    smoothing = float((ckpt.get("config") or {}).get("label_smoothing", 0.0))
    cfg = FinetuneConfig() if args.epochs is None else FinetuneConfig(epochs=args.epochs)
    # as train.finetune does for K shots per class (its median class has K images)
    prep = dataclasses.replace(prep, input_size=finetune_size(cfg, prep.input_size, args.shots))
    augment = AUGMENTS[cfg.augment]
    lab = scan_dataset(args.data, ClassMap.load(None), seed=0)
    unknown = sorted(set(lab.classes) - set(classes))
    if unknown:
        log.error("%s has classes the checkpoint does not know (%s): use train.finetune", args.data, ", ".join(unknown))
        return 2
    labels = np.array([classes.index(lab.classes[i]) for i in lab.labels])
    x_lab = to_tensor_nchw(ImageCache.build(Samples(lab.root, lab.paths, labels.tolist(), classes), prep, 1).images)

    def fit(x, y: np.ndarray, weights: np.ndarray, seed: int) -> None:
        model.load_state_dict(parent)
        train_steps(model, x, torch.from_numpy(y.astype(np.int64)), None, torch.as_tensor(weights), augment, smoothing,
                    cfg, seed)
        model.eval()
        model.tta = check_tta("dihedral8")

    def balanced(y: np.ndarray) -> np.ndarray:
        return 1.0 / np.bincount(y, minlength=len(classes))[y]

    def probs(idx) -> torch.Tensor:
        return torch.softmax(predict_logits(model, x_lab[idx], torch.device("cpu")), 1)

    plain, idea = [], []
    wrong: dict[int, list[bool]] = {}  # held-out photo -> the plain fine-tune got it wrong, per seed it was held out
    for seed in args.seeds:
        tr, va = (np.array(i) for i in shot_split(labels.tolist(), args.shots, seed))
        fit(x_lab[tr], labels[tr], balanced(labels[tr]), seed)
        p_plain = probs(va)
        plain.append(float((p_plain.argmax(1).numpy() == labels[va]).mean()))
        for i, ok in zip(va, p_plain.argmax(1).numpy() == labels[va]):
            wrong.setdefault(int(i), []).append(not ok)
        if args.mode == "selftrain":
            half = np.random.default_rng(seed).permutation(len(va)) % 2  # [N_held] 0/1
            right = 0
            for k in (0, 1):
                pool, evaluated = va[half != k], va[half == k]
                conf, guess = p_plain[torch.from_numpy(half != k)].max(1)
                keep = conf.numpy() >= args.threshold
                y = np.concatenate([labels[tr], guess.numpy()[keep]])
                fit(x_lab[np.concatenate([tr, pool[keep]])], y, balanced(y), seed)
                right += int((probs(evaluated).argmax(1).numpy() == labels[evaluated]).sum())
                log.info("seed %d half %d: %d of %d unlabelled kept, %.1f%% of them labelled right", seed, k,
                         keep.sum(), len(pool), 100 * float((guess.numpy()[keep] == labels[pool][keep]).mean()))
            idea.append(right / len(va))
        else:
            old = load_split_samples(Path(args.from_run) / "split.json", "train")
            rng = random.Random(seed)
            pick = [i for c in range(len(old.classes))
                    for i in rng.sample([j for j, lb in enumerate(old.labels) if lb == c],
                                        min(args.per_class, sum(lb == c for lb in old.labels)))]
            reh = ImageCache.build(Samples(old.root, [old.paths[i] for i in pick],
                                           [classes.index(old.classes[old.labels[i]]) for i in pick], classes), prep, 1)
            y_new, y_old = labels[tr], reh.labels.astype(np.int64)
            w = np.concatenate([(1 - args.share) * balanced(y_new) / len(np.unique(y_new)),
                                args.share * balanced(y_old) / len(np.unique(y_old))])
            fit(torch.cat([x_lab[tr], to_tensor_nchw(reh.images)]), np.concatenate([y_new, y_old]), w, seed)
            idea.append(float((probs(va).argmax(1).numpy() == labels[va]).mean()))
        log.info("seed %d: plain fine-tune %.1f%%, %s %.1f%%", seed, 100 * plain[-1], args.mode, 100 * idea[-1])
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    log.info("mean over %d seeds: plain %.1f%% ± %.1f, %s %.1f%% ± %.1f", len(plain), 100 * statistics.mean(plain),
             100 * sd(plain), args.mode, 100 * statistics.mean(idea), 100 * sd(idea))
    hard = sorted(i for i, w in wrong.items() if len(w) >= 2 and sum(w) > len(w) / 2)
    log.info("%d held-out photos the plain fine-tune gets wrong in most of the draws that hold them out: %s",
             len(hard), ", ".join(str(lab.paths[i]) for i in hard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
