"""The app's torch-free preprocessing equals training's (train/data.load_rgb + Preprocessing.apply) pixel for pixel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_app import images as img
from mobile_app import imaging

train_data = pytest.importorskip("train.data")
from train.preprocess import Preprocessing  # noqa: E402

TOLERANCE = 1.0 / 255.0


def train_input(path: Path, size: int) -> np.ndarray:
    """What training feeds the model: [1, 3, S, S] float32 in 0..1."""
    square = Preprocessing(input_size=size).apply(train_data.load_rgb(path))
    return (np.asarray(square, dtype=np.uint8).astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]


def app_input(path: Path, size: int) -> np.ndarray:
    return imaging.to_input(imaging.decode(path), size)


@pytest.fixture(scope="module")
def real(pbc_dev: Path) -> list[Path]:
    paths = img.real_images(pbc_dev, per_class=5)
    assert len(paths) >= 40, f"expected 8 classes x 5 images in {pbc_dev}"
    return paths


@pytest.mark.parametrize("size", [64, 256])
def test_matches_training_on_real_images(real: list[Path], size: int, record_property) -> None:
    diffs = []
    for p in real:
        a, t = app_input(p, size), train_input(p, size)
        assert a.shape == t.shape == (1, 3, size, size) and a.dtype == np.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        diffs.append(float(np.abs(a - t).max()))
    worst = max(diffs)
    record_property(f"max_abs_diff_{size}px", worst)
    print(f"\n{len(real)} real pbc_dev images at {size}px: max |app - train| = {worst:.3g} (limit {TOLERANCE:.4f})")
    assert worst <= TOLERANCE


@pytest.mark.parametrize("encoding", sorted(img.ENCODINGS))
def test_matches_training_on_unusual_encodings(real: list[Path], encoding: str, tmp_path: Path,
                                               record_property) -> None:
    if encoding == "rgb16_tiff":
        pytest.importorskip("tifffile")
    path = img.ENCODINGS[encoding](real[0], tmp_path / encoding)
    decoded = imaging.decode(path)
    assert decoded.rgb.mode == "RGB" and decoded.scale == 1.0
    worst = float(np.abs(app_input(path, 64) - train_input(path, 64)).max())
    record_property(f"max_abs_diff_{encoding}", worst)
    assert worst <= TOLERANCE, f"{encoding}: max diff {worst}"


@pytest.mark.parametrize("w,h,box", [(360, 363, (0, 1, 360, 361)), (400, 300, (50, 0, 350, 300)),
                                     (301, 300, (0, 0, 300, 300)), (64, 64, (0, 0, 64, 64))])
def test_crop_box_is_the_largest_centred_square(w: int, h: int, box: tuple) -> None:
    assert imaging.crop_box(w, h) == box == Preprocessing(input_size=64).crop_box(w, h)


def test_mobile_app_stays_torch_free() -> None:
    """The phone build has no torch: nothing in mobile_app may import torch, train or export at module level."""
    import ast

    for py in Path(imaging.__file__).parent.glob("*.py"):
        tree = ast.parse(py.read_text())
        for node in tree.body:  # module level only; runtimes.py imports torch lazily inside ExecuTorchDesktop
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in ("torch", "train", "export", "timm"), f"{py.name} imports {n}"
