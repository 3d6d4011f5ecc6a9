"""Training end to end on real images: outputs, config resolution, errors, kill-and-resume, DDP, evaluation."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from train.checkpoint import load_checkpoint
from train.config import get_args_parser, resolve_config

SMOKE = ["--preset", "smoke", "--image-size", "64"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_smoke_run_writes_every_output(smoke_run: Path) -> None:
    for name in ("best.pt", "last.pt", "config.yaml", "split.json", "metrics.csv", "train.log",
                 "accuracy.png", "loss.png", "confusion_matrix.png"):
        assert (smoke_run / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(smoke_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    ck = load_checkpoint(smoke_run / "best.pt")
    assert ck["arch"] == "mobilevit_xxs" and len(ck["classes"]) == 8
    assert ck["preprocessing"]["input_size"] == 64 and ck["preprocessing"]["resize"] == "center_square_crop_then_resize"
    assert yaml.safe_load((smoke_run / "config.yaml").read_text())["preset"] == "smoke"
    assert "epoch 3/3" in (smoke_run / "train.log").read_text()


def test_preset_resolution_and_overrides(caplog) -> None:
    cfg = resolve_config(get_args_parser().parse_args(["--data", "x", "--preset", "cpu", "--epochs", "7",
                                                      "--lr", "0.01", "--amp", "false"]))
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.arch, cfg.image_size) == (7, 0.01, False, "mobilevit_xxs", 128)
    cfg = resolve_config(get_args_parser().parse_args(["--data", "x"]))  # no preset, no GPU here -> cpu, loudly
    assert cfg.preset == ("paper" if __import__("torch").cuda.is_available() else "cpu")
    assert "NO --preset GIVEN" in caplog.text
    assert resolve_config(get_args_parser().parse_args(["--data", "x", "--preset", "paper"])).batch_size == 128


@pytest.mark.parametrize("argv,expected", [
    (["--arch", "vit_huge"], "valid: mobilevit_xxs, mobilevit_xs, mobilevit_s, resnet50"),
    (["--augment", "mixup"], "valid: none, cells"),
    (["--mixstyle", "1.5"], "mixstyle is a probability in 0..1, got 1.5"),
    (["--mixstyle", "0.5", "--arch", "resnet50"], "mixstyle needs one of mobilevit_xxs"),
    (["--mixup", "-0.2"], "mixup is a Beta distribution's alpha, >= 0 (0: off), got -0.2"),
    (["--drop-path", "1.0"], "drop_path is a probability in 0..1, got 1.0"),
    (["--drop-path", "0.1", "--arch", "resnet50"], "drop_path needs a timm network (mobilevit_xxs, mobilevit_xs"),
])
def test_bad_options_list_valid_choices(argv: list[str], expected: str, pbc_sample: Path, tmp_path: Path,
                                        caplog) -> None:
    from train.cli import main

    assert main(["--data", str(pbc_sample), "--run-dir", str(tmp_path / "r"), *SMOKE, *argv]) == 2
    assert expected in caplog.text


def test_existing_run_is_not_overwritten(smoke_run: Path, pbc_sample: Path, caplog) -> None:
    from train.cli import main

    before = (smoke_run / "best.pt").stat().st_mtime
    assert main(["--data", str(pbc_sample), "--run-dir", str(smoke_run), *SMOKE]) == 2
    assert "pass --resume" in caplog.text and (smoke_run / "best.pt").stat().st_mtime == before


def test_help_names_defaults_and_choices_and_print_config_trains_nothing(tmp_path: Path, capsys) -> None:
    import yaml

    from train.cli import main

    help_text = " ".join(get_args_parser().format_help().split())
    for fragment in ("--lr LR peak learning rate (default 0.001", "one of: none, cells, dihedral, robust",
                     "one of: mobilevit_xxs, mobilevit_xs", "one of: adamw, adam, sgd", "one of: center, cell"):
        assert fragment in help_text
    run = tmp_path / "never"
    assert main(["--data", "x", "--run-dir", str(run), "--preset", "crosslab", "--lr", "0.004", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["lr"], cfg["crop"], cfg["input_norm"]) == (0.004, "cell", "od_sharp") and not run.exists()


def test_reloading_a_runs_config_gives_the_identical_config(smoke_run: Path) -> None:
    """--config after the preset: a run's own config.yaml (with its overrides) comes back field for field."""
    import yaml

    saved = yaml.safe_load((smoke_run / "config.yaml").read_text())
    cfg = resolve_config(get_args_parser().parse_args(["--config", str(smoke_run / "config.yaml")]))
    assert saved["epochs"] == 3 and cfg.to_dict() == saved  # 3 is the fixture's override of the preset's 2


@pytest.mark.parametrize("change,field", [(["--image-size", "96"], "image_size"), (["--lr", "0.1"], "lr"),
                                          (["--augment", "dihedral"], "augment")])
def test_mismatched_resume_is_refused_naming_the_fields(change: list[str], field: str, smoke_run: Path,
                                                        pbc_sample: Path, caplog) -> None:
    from train.cli import main

    before, config = (smoke_run / "last.pt").stat().st_mtime, (smoke_run / "config.yaml").read_text()
    assert main(["--config", str(smoke_run / "config.yaml"), "--run-dir", str(smoke_run), "--resume", *change]) == 2
    assert f"{field} was" in caplog.text and "Start over" in caplog.text
    assert (smoke_run / "last.pt").stat().st_mtime == before
    assert (smoke_run / "config.yaml").read_text() == config  # the refused config does not replace the run's own


def _metrics(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


# ema_warmup and fp16_gradscaler take 40-80 s each on 2 cores: `make test-slow` runs them
@pytest.mark.parametrize("extra", [[], pytest.param(["--ema-decay", "0.99", "--warmup-epochs", "2"], marks=pytest.mark.slow),
                                   pytest.param(["--amp-dtype", "fp16"], marks=pytest.mark.slow)],
                         ids=["plain", "ema_warmup", "fp16_gradscaler"])
def test_killed_run_resumes_and_matches_an_unbroken_run(extra: list[str], pbc_sample: Path, tmp_path: Path) -> None:
    """fp16_gradscaler: autocast to fp16 with torch.amp.GradScaler("cpu"), the path of GPUs without native bf16:
    the scaler's state (loss scale, growth tracker) goes into last.pt and comes back on --resume."""
    args = [sys.executable, "-m", "train", "--data", str(pbc_sample), *SMOKE, "--epochs", "5",
            "--max-steps-per-epoch", "5", "--plots", "false", "--threads", "1", *extra]
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    proc = subprocess.Popen([*args, "--run-dir", str(broken)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once two epochs are checkpointed, mid-training
        if (broken / "metrics.csv").exists() and len(_metrics(broken)) >= 2:  # written after last.pt
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(broken / "last.pt")  # atomic: the file on disk is whole
    done = interrupted["epoch"]
    assert 2 <= done < 5, f"run was not interrupted mid-training ({done} epochs done)"
    fresh_scaler = {"scale": 65536.0, "_growth_tracker": 0}
    if "fp16" in extra:  # a scaler that has counted steps: restoring it is observable
        assert {k: interrupted["scaler"][k] for k in fresh_scaler} != fresh_scaler, interrupted["scaler"]
    else:
        assert interrupted["scaler"] is None
    resumed = subprocess.run([*args, "--run-dir", str(broken), "--resume"], env=_env(), cwd=REPO, check=True,
                             capture_output=True, text=True)
    if "fp16" in extra:  # the scaler in the resumed process is the one saved, not a fresh one
        sc = interrupted["scaler"]
        assert f"GradScaler restored: scale {sc['scale']:g}, growth tracker {sc['_growth_tracker']}" in resumed.stderr
    subprocess.run([*args, "--run-dir", str(whole)], env=_env(), cwd=REPO, check=True, capture_output=True)
    a, b = _metrics(broken), _metrics(whole)
    assert [int(r["epoch"]) for r in a] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):  # same batches, same augmentation, same weights: resume is exact
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), abs=1e-4)
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), abs=1e-4)
    assert load_checkpoint(broken / "last.pt")["scaler"] == load_checkpoint(whole / "last.pt")["scaler"]


def test_epoch_loss_and_accuracy_are_the_per_step_values(pbc_sample: Path, tmp_path: Path, monkeypatch) -> None:
    """The loop sums loss and correct predictions on the device and reads them once per epoch (no .item() per
    step on a GPU); metrics.csv must hold exactly what the per-step `loss.item() * n` sums gave, uneven last
    batch included."""
    import torch.nn.functional as F

    from train.cli import main

    real, steps = F.cross_entropy, []

    def recording(logits, y, *args, **kwargs):
        loss = real(logits, y, *args, **kwargs)
        if logits.requires_grad:  # training steps only (validation runs under no_grad)
            steps.append((loss.item(), len(y), int((logits.argmax(1) == y).sum())))
        return loss

    monkeypatch.setattr(F, "cross_entropy", recording)
    run = tmp_path / "acc"
    assert main(["--data", str(pbc_sample), "--run-dir", str(run), *SMOKE, "--epochs", "2", "--batch-size", "30",
                 "--max-steps-per-epoch", "0", "--plots", "false", "--threads", "1"]) == 0
    rows = _metrics(run)
    n_train = len(json.loads((run / "split.json").read_text())["train"])
    sizes = [min(30, n_train - i) for i in range(0, n_train, 30)]
    assert len(sizes) == 3 and sizes[-1] < 30  # the sample's 80-odd training images: an uneven last batch
    assert [n for _, n, _ in steps] == sizes * 2
    for row, epoch_steps in zip(rows, (steps[:3], steps[3:])):
        loss_sum, correct, seen = 0.0, 0, 0
        for loss, n, c in epoch_steps:  # the old loop's arithmetic
            loss_sum += loss * n
            correct += c
            seen += n
        assert float(row["train_loss"]) == loss_sum / seen
        assert float(row["train_acc"]) == correct / seen


@pytest.mark.parametrize("kind,port", [("folder", 29533), ("zip", 29534)])
def test_ddp_two_processes_gloo(kind: str, port: int, pbc_sample: Path, tmp_path: Path) -> None:
    """Two ranks: rank 0 extracts a .zip and decodes the training images once, rank 1 waits and memory-maps them."""
    import zipfile

    run, cache = tmp_path / "ddp", tmp_path / "xdg_cache"
    data = pbc_sample
    if kind == "zip":
        data = tmp_path / "cells.zip"
        with zipfile.ZipFile(data, "w") as zf:
            for f in sorted(pbc_sample.rglob("*.jpg")):
                zf.write(f, f"cells/{f.relative_to(pbc_sample)}")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "train", "--data", str(data), "--run-dir", str(run), *SMOKE, "--device", "cpu",
                          "--epochs", "2", "--threads", "1", "--plots", "false"],
                         env={**_env(), "XDG_CACHE_HOME": str(cache)}, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world=2" in (run / "train.log").read_text()
    assert len(_metrics(run)) == 2 and load_checkpoint(run / "best.pt")["epoch"] in (1, 2)
    assert re.search(r"rank 1: \d+ decoded training images memory-mapped", res.stderr), res.stderr[-3000:]
    assert not list(run.glob(".decoded*")), "the shared decode is removed once every rank has mapped it"
    if kind == "zip":  # extracted once, atomically: one complete folder, no temp folders left
        extracted = list((cache / "cellvit-mobile").iterdir())
        assert len(extracted) == 1 and (extracted[0] / ".complete").exists(), extracted


def test_evaluate_on_a_folder_and_on_the_split(smoke_run: Path, pbc_sample: Path, tmp_path: Path, capsys) -> None:
    from train.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--run-dir", str(smoke_run), "--data", str(pbc_sample), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 96 and set(rep) >= {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert sum(map(sum, rep["confusion_matrix"])) == 96
    assert "macro-F1" in capsys.readouterr().out
    assert main(["--run-dir", str(smoke_run)]) == 0  # default: the held-out test split, never the val that chose best.pt
    test = json.loads((smoke_run / "eval" / "test.json").read_text())
    split = json.loads((smoke_run / "split.json").read_text())
    assert test["n"] == len(split["test"]) == 8 and "test split" in test["source"]
    assert main(["--run-dir", str(smoke_run), "--split", "val"]) == 0
    assert json.loads((smoke_run / "eval" / "val.json").read_text())["n"] == len(split["val"])


def test_evaluate_refuses_a_folder_with_other_classes(smoke_run: Path, pbc_sample: Path, tmp_path: Path,
                                                      caplog) -> None:
    from train.evaluate import main

    other = tmp_path / "other"
    for cls in ("blast", "neutrophil"):
        (other / cls).mkdir(parents=True)
        for f in sorted((pbc_sample / "neutrophil").iterdir())[:2]:
            os.symlink(f.resolve(), other / cls / f.name)
    assert main(["--run-dir", str(smoke_run), "--data", str(other)]) == 2
    assert "['blast'] are not among the model's classes" in caplog.text
