"""Split a labelled folder into two halves of links (every other file of each class), e.g. for a GPU job.

python -m benchmarks.half_split --data ../shared/data/pbc_dev --out runs/data

writes <out>/<name>_half (files 0, 2, 4, ... of each class, sorted by name: what a device job can
carry) and <out>/<name>_other_half (files 1, 3, 5, ...: never seen by a model trained on the first
half, so a held-out test set for it). The halves are symbolic links to the original files.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def split_halves(data: Path, out: Path) -> tuple[Path, Path]:
    from train.data import scan_dataset

    samples = scan_dataset(data)
    first, second = out / f"{Path(data).name}_half", out / f"{Path(data).name}_other_half"
    by_class: dict[int, list[str]] = {}
    for rel, label in zip(samples.paths, samples.labels):
        by_class.setdefault(label, []).append(rel)
    for label, rels in by_class.items():
        for i, rel in enumerate(sorted(rels, key=lambda r: Path(r).name)):
            dest = (first if i % 2 == 0 else second) / samples.classes[label] / Path(rel).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to((samples.root / rel).resolve())
    return first, second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/data")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    a, b = split_halves(Path(args.data), Path(args.out))
    print(f"{a}\n{b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
