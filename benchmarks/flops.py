"""Parameters and FLOPs (2 x multiply-adds, as the paper counts them) of every architecture at its paper input size."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The paper's figures (GFLOPs = 2 x GMACs), used only to check this counter; never shown as results.
PAPER_GFLOPS: dict[str, float] = {"resnet50": 8.22, "densenet121": 5.73, "mobilevit_xs": 1.80}
DEFAULT_NUM_CLASSES = 8  # PBC's 8 cell types; 8 vs 1000 classes changes FLOPs by <0.1% (only the last layer)


def count_flops(model, input_size: int, batch: int = 1) -> int:
    """FLOPs of one forward pass on [batch, 3, S, S], as counted by torch's FlopCounterMode.

    FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions, matmuls and attention
    (the convention of the paper's "FLOPs"); element-wise ops (BN, activations, adds) are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, input_size, input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def flops_per_mac() -> float:
    """Measured convention: FLOPs FlopCounterMode reports per multiply-accumulate (2.0 expected)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    lin = torch.nn.Linear(3, 5, bias=False)  # 15 multiply-accumulates
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lin(torch.zeros(1, 3))
    return counter.get_total_flops() / 15


def arch_cost(arch: str, num_classes: int = DEFAULT_NUM_CLASSES, input_size: int | None = None) -> dict:
    """{'arch', 'input_size', 'num_classes', 'params', 'flops'} for the exported network (normalisation included)."""
    from train.models import ARCHS, check_arch

    check_arch(arch)
    return dict(_arch_cost(arch, num_classes, input_size or ARCHS[arch][2]))


@functools.lru_cache(maxsize=None)
def _arch_cost(arch: str, num_classes: int, size: int) -> tuple:
    from train.models import count_params, create_model
    from train.preprocess import IMAGENET_MEAN, IMAGENET_STD

    model = create_model(arch, num_classes, IMAGENET_MEAN, IMAGENET_STD)
    return (("arch", arch), ("input_size", size), ("num_classes", num_classes), ("params", count_params(model)),
            ("flops", count_flops(model, size)))


def format_table(rows: list[dict]) -> str:
    lines = ["| model | input | classes | params (M) | GFLOPs | paper GFLOPs | diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER_GFLOPS.get(r["arch"]) if r["input_size"] == _paper_size(r["arch"]) else None
        g = r["flops"] / 1e9
        diff = f"{(g - paper) / paper * 100:+.1f}%" if paper else ""
        lines.append(f"| {r['arch']} | {r['input_size']} | {r['num_classes']} | {r['params'] / 1e6:.2f} | {g:.2f} | "
                     f"{paper if paper else ''} | {diff} |")
    return "\n".join(lines)


def _paper_size(arch: str) -> int:
    from train.models import ARCHS

    return ARCHS[arch][2]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__)
    p.add_argument("--arch", action="append", help="architecture (repeatable; default: all of train.models.ARCHS)")
    p.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES)
    p.add_argument("--input-size", type=int, default=None,
                   help="override the paper input size (224 CNNs, 256 MobileViT)")
    p.add_argument("--out", default="runs/bench", help="folder for flops.md and flops.json")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    from train.models import ARCHS

    archs = args.arch or list(ARCHS)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        log.error("unknown architecture(s) %s; valid: %s", ", ".join(unknown), ", ".join(ARCHS))
        return 2
    per_mac = flops_per_mac()
    log.info("FlopCounterMode counts %.1f FLOPs per multiply-accumulate", per_mac)
    rows = []
    for a in archs:
        rows.append(arch_cost(a, args.num_classes, args.input_size))
        log.info("%s: %.2fM params, %.3f GFLOPs at %d px", a, rows[-1]["params"] / 1e6, rows[-1]["flops"] / 1e9,
                 rows[-1]["input_size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flops.json").write_text(json.dumps({"flops_per_mac": per_mac, "rows": rows}, indent=1))
    table = format_table(rows)
    (out / "flops.md").write_text(f"# Parameters and FLOPs\n\nFLOPs = {per_mac:g} x multiply-accumulates "
                                  f"(torch.utils.flop_counter.FlopCounterMode), batch 1.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
