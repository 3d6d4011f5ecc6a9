"""Mixup and stochastic depth (train.step.mixup_batch, --drop-path) on real PBC cells: training-only, plain checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellcore.preprocess import Preprocessing
from train.checkpoint import load_checkpoint
from train.data import load_rgb
from train.models import create_model
from train.step import mixup_batch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cells(pbc_sample: Path, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 3, 64, 64] float32 in 0..1 (real cells, one of each class first) and their [n] int64 class indices."""
    classes = sorted(d.name for d in pbc_sample.iterdir() if d.is_dir())
    per_class = [sorted(p for p in (pbc_sample / c).iterdir() if p.is_file()) for c in classes]
    paths = [p for rank in zip(*per_class) for p in rank][:n]
    pre = Preprocessing(input_size=64)
    x = torch.stack([torch.from_numpy(np.array(pre.apply(load_rgb(p)))).permute(2, 0, 1) for p in paths]).float()
    return x / 255, torch.tensor([classes.index(p.parent.name) for p in paths])


def test_mixup_blends_each_cell_with_one_other_and_the_targets_alike(pbc_sample: Path) -> None:
    x, y = _cells(pbc_sample)
    assert len(set(y.tolist())) >= 3
    torch.manual_seed(0)
    out, t = mixup_batch(x, y, 8, 1.0)  # alpha 1: the weight is uniform in 0..1
    assert out.shape == x.shape and t.shape == (len(y), 8) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(len(y)))
    lams = []
    for i in range(len(x)):
        if torch.allclose(out[i], x[i], atol=1e-6, rtol=0):  # shuffled onto itself
            torch.testing.assert_close(t[i], torch.nn.functional.one_hot(y[i], 8).float())
            continue
        # out[i] = lam x[i] + (1 - lam) x[j] for one other j: solve lam by least squares against each candidate
        fits = []
        for j in set(range(len(x))) - {i}:
            d = (x[i] - x[j]).flatten()
            lam = float(torch.dot((out[i] - x[j]).flatten(), d) / torch.dot(d, d))
            err = float((out[i] - (lam * x[i] + (1 - lam) * x[j])).abs().max())
            fits.append((err, j, lam))
        err, j, lam = min(fits)
        assert err < 1e-5, f"image {i} is not a blend of two cells of the batch"
        expect = lam * torch.nn.functional.one_hot(y[i], 8) + (1 - lam) * torch.nn.functional.one_hot(y[j], 8)
        torch.testing.assert_close(t[i], expect.float(), atol=1e-5, rtol=0)
        lams.append(lam)
    assert len(lams) >= len(x) // 2 and np.ptp(lams) < 1e-5, "one weight per batch"
    assert 0.05 < lams[0] < 0.95
    torch.manual_seed(1)
    out2, _ = mixup_batch(x, y, 8, 0.4)
    assert not torch.equal(out, out2), "another draw gives another blend"


def test_drop_path_skips_blocks_in_training_only(pbc_sample: Path) -> None:
    x, _ = _cells(pbc_sample, 4)
    torch.manual_seed(0)
    dropping = create_model("mobilevit_xxs", 8, MEAN, STD, "od_sharp", drop_path=0.2)
    plain = create_model("mobilevit_xxs", 8, MEAN, STD, "od_sharp")
    dropping.train()
    with torch.no_grad():
        a, b = dropping(x), dropping(x)
    assert not torch.allclose(a, b), "in training the skipped blocks differ from call to call"
    plain.load_state_dict(dropping.state_dict())  # the same names (and batch-norm statistics): loads either way
    dropping.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping(x), plain(x), atol=0, rtol=0)


@pytest.mark.parametrize("flags,key,value", [(["--mixup", "0.4"], "mixup", 0.4),
                                             (["--drop-path", "0.1"], "drop_path", 0.1)])
def test_a_run_with_a_training_only_regulariser_saves_a_plain_checkpoint(flags: list[str], key: str, value: float,
                                                                         pbc_sample: Path, smoke_run: Path,
                                                                         tmp_path: Path) -> None:
    from train.cli import main

    run = tmp_path / key
    assert main(["--data", str(pbc_sample), "--run-dir", str(run), "--preset", "smoke", "--epochs", "1",
                 "--max-steps-per-epoch", "3", *flags]) == 0
    ck, ref = load_checkpoint(run / "best.pt"), load_checkpoint(smoke_run / "best.pt")
    assert ck["config"][key] == value
    assert {k: v.shape for k, v in ck["model"].items()} == {k: v.shape for k, v in ref["model"].items()}
    assert np.isfinite(ck["metrics"]["train_loss"])
