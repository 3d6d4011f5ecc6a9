"""benchmarks.flops reproduces the paper's FLOPs (2 x multiply-adds) within 3%."""
from __future__ import annotations

import pytest


def test_counter_counts_two_flops_per_multiply_add_on_a_hand_counted_network():
    import torch

    from benchmarks.flops import count_flops

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 16 * 16, 4))
    macs = 8 * 3 * 3 * 3 * 16 * 16 + 8 * 16 * 16 * 4  # conv: out ch x in ch x k x k x H x W; linear: in x out
    assert count_flops(net, input_size=16) == 2 * macs
    assert count_flops(net, input_size=16, batch=3) == 3 * 2 * macs


@pytest.mark.parametrize("arch, paper_gflops", [("resnet50", 8.22), ("densenet121", 5.73), ("mobilevit_xs", 1.80)])
def test_flops_match_paper(arch: str, paper_gflops: float):
    from benchmarks.flops import arch_cost
    from train.models import ARCHS

    cost = arch_cost(arch, num_classes=8)  # the paper's input size: 224 CNNs, 256 MobileViT
    assert cost["input_size"] == ARCHS[arch][2]
    g = cost["flops"] / 1e9
    assert abs(g - paper_gflops) / paper_gflops < 0.03, f"{arch}: {g:.3f} GFLOPs vs paper {paper_gflops}"
    assert cost["params"] > 1e6


def test_flops_cli_writes_table(tmp_path):
    from benchmarks.flops import main

    assert main(["--arch", "mobilevit_xxs", "--input-size", "64", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "flops.md").read_text()
    assert "mobilevit_xxs" in md and "| 64 |" in md
    assert main(["--arch", "no_such_net", "--out", str(tmp_path)]) == 2
