"""Shared fixtures: the real pbc_dev data, a small real sample of it, and a tiny trained + exported run."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = 12  # sample size per class: enough for a split with every class in validation


@pytest.fixture(scope="session")
def pbc_dev() -> Path:
    """The real peripheral-blood images (../shared/data/pbc_dev, or $PBC_DEV). Missing data fails loudly."""
    path = Path(os.environ.get("PBC_DEV", REPO.parent / "shared" / "data" / "pbc_dev")).resolve()
    if not (path / "neutrophil").is_dir():
        pytest.fail(f"real test data not found at {path}: set PBC_DEV or place shared/data beside the repo")
    return path


def make_sample(pbc_dev: Path, dest: Path, per_class: int = PER_CLASS, classes: list[str] | None = None) -> Path:
    """A class-folder dataset of symlinks to the first `per_class` images of each pbc_dev class."""
    for cls in sorted(d.name for d in pbc_dev.iterdir() if d.is_dir()):
        if classes and cls not in classes:
            continue
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((pbc_dev / cls).iterdir())[:per_class]:
            os.symlink(f, dest / cls / f.name)
    return dest


@pytest.fixture(scope="session")
def pbc_sample(pbc_dev: Path, tmp_path_factory) -> Path:
    return make_sample(pbc_dev, tmp_path_factory.mktemp("pbc_sample"))


@pytest.fixture(scope="session")
def smoke_run(pbc_sample: Path, tmp_path_factory) -> Path:
    """runs/<name>/ of a real (tiny) training: smoke preset, 64 px, on the pbc sample. ~10 s."""
    from train.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    rc = main(["--data", str(pbc_sample), "--run-dir", str(run_dir), "--preset", "smoke", "--epochs", "3",
               "--max-steps-per-epoch", "6"])
    assert rc == 0, "smoke training failed"
    return run_dir


SMOKE_FORMATS = ["onnx_fp32", "onnx_int8", "xnnpack_fp32", "xnnpack_int8", "coreml_fp16"]


@pytest.fixture(scope="session")
def smoke_export(smoke_run: Path) -> Path:
    """runs/<name>/export/ of the smoke run: manifest + ONNX fp32/int8, XNNPACK fp32/int8, Core ML fp16."""
    from export.cli import main

    rc = main(["--run-dir", str(smoke_run), "--formats", *SMOKE_FORMATS, "--calib-images", "32"])
    assert rc == 0, "smoke export failed"
    return smoke_run / "export"


@pytest.fixture
def export_copy(smoke_export: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run (checkpoint, split, export) that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(smoke_export.parent, dst, symlinks=True)
    return dst
