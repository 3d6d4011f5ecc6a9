"""MixStyle (train.mixstyle) on real PBC cells: what it mixes, that eval and exports never see it, and a run with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellcore.preprocess import Preprocessing
from train.data import load_rgb
from train.checkpoint import load_checkpoint
from train.mixstyle import attach_mixstyle, mixstyle
from train.models import create_model


def _batch(pbc_sample: Path, n: int = 8) -> torch.Tensor:
    """[n, 3, 64, 64] float32 in 0..1: real cells of several classes."""
    paths = sorted(p for p in pbc_sample.rglob("*") if p.is_file())[::3][:n]
    pre = Preprocessing(input_size=64)
    return torch.stack([torch.from_numpy(np.asarray(pre.apply(load_rgb(p)))).permute(2, 0, 1) for p in paths]).float() / 255


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mobilevit_xxs", 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "od_sharp")


def test_each_image_gets_a_mix_of_its_own_and_one_other_images_statistics(pbc_sample: Path) -> None:
    with torch.no_grad():
        feats = _model().backbone.stem(_batch(pbc_sample))  # [8, C, 32, 32] real early features
    mu, sig = feats.mean((2, 3)), feats.std((2, 3), unbiased=True)
    torch.manual_seed(1)
    out = mixstyle(feats, p=1.0, alpha=0.3)
    assert out.shape == feats.shape and not torch.allclose(out, feats)
    mu_o, sig_o = out.mean((2, 3)), out.std((2, 3), unbiased=True)
    for i in range(len(feats)):
        # out_i's channel means are lam * mu_i + (1 - lam) * mu_j for one lam and one partner j (maybe i itself),
        # and its standard deviations the same mix of sig_i and sig_j
        fits = []
        for j in range(len(feats)):
            d = mu[i] - mu[j]
            lam = 1.0 if d.norm() < 1e-6 else float(((mu_o[i] - mu[j]) @ d) / (d @ d))
            fits.append((float((mu_o[i] - (lam * mu[i] + (1 - lam) * mu[j])).abs().max()), j, lam))
        err, j, lam = min(fits)
        assert err < 1e-3 and -1e-3 <= lam <= 1 + 1e-3, (i, fits)
        assert torch.allclose(sig_o[i], lam * sig[i] + (1 - lam) * sig[j], atol=2e-3)


def test_p_zero_changes_nothing_and_eval_mode_is_the_plain_model(pbc_sample: Path) -> None:
    x = _batch(pbc_sample)
    feats = _model().backbone.stem(x)
    assert torch.equal(mixstyle(feats, p=0.0), feats)
    plain, hooked = _model(), _model()
    handles = attach_mixstyle(hooked, "mobilevit_xxs", 1.0)
    plain.eval(), hooked.eval()
    with torch.no_grad():
        assert torch.equal(hooked(x), plain(x))  # eval (evaluate, export, the app): no MixStyle
        hooked.train(), plain.train()
        torch.manual_seed(0)
        assert not torch.allclose(hooked(x), plain(x), atol=1e-4)  # training: the hooks act
        for h in handles:
            h.remove()
        assert torch.equal(hooked(x), plain(x))
    with pytest.raises(ValueError, match="valid: mobilevit_xxs"):
        attach_mixstyle(plain, "resnet50", 0.5)


def test_a_run_with_mixstyle_saves_a_plain_checkpoint(pbc_sample: Path, smoke_run: Path, tmp_path: Path) -> None:
    from train.cli import main

    run = tmp_path / "mix"
    assert main(["--data", str(pbc_sample), "--run-dir", str(run), "--preset", "smoke", "--epochs", "1",
                 "--max-steps-per-epoch", "3", "--mixstyle", "0.5"]) == 0
    ck, ref = load_checkpoint(run / "best.pt"), load_checkpoint(smoke_run / "best.pt")
    assert ck["config"]["mixstyle"] == 0.5
    assert {k: v.shape for k, v in ck["model"].items()} == {k: v.shape for k, v in ref["model"].items()}
