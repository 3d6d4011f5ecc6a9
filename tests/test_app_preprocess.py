"""The app's torch-free preprocessing equals training's (train/data.load_rgb + Preprocessing.apply) pixel for pixel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_app import images as img
from cellcore import imaging

train_data = pytest.importorskip("train.data")
from train.preprocess import Preprocessing  # noqa: E402

TOLERANCE = 0.0  # the app runs the same cellcore code on the same decoded pixels: identical, not close
POLICIES = ("center_square_crop_then_resize", "cell_square_crop_then_resize")
# The crops a manifest can ask for: the centred square, the nucleus-framed one as older manifests and the `cpu`
# preset's cell runs frame it, and the crosslab preset's (at least 0.45 and at most 1.0 of the short side).
CROPS = {"center": dict(resize=POLICIES[0]), "cell": dict(resize=POLICIES[1]),
         "cell_0.45_1.0": dict(resize=POLICIES[1], cell_min_side=0.45, cell_max_side=1.0)}


def train_input(path: Path, size: int, crop: str = "center") -> np.ndarray:
    """What training feeds the model: [1, 3, S, S] float32 in 0..1."""
    square = Preprocessing(input_size=size, **CROPS[crop]).apply(train_data.load_rgb(path))
    return (np.asarray(square, dtype=np.uint8).astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]


def app_input(path: Path, size: int, crop: str = "center") -> np.ndarray:
    return imaging.to_input(imaging.decode(path), Preprocessing(input_size=size, **CROPS[crop]))


@pytest.fixture(scope="module")
def real(pbc_dev: Path) -> list[Path]:
    paths = img.real_images(pbc_dev, per_class=5)
    assert len(paths) >= 40, f"expected 8 classes x 5 images in {pbc_dev}"
    return paths


@pytest.fixture(scope="module")
def crosslab(pbc_dev: Path) -> list[Path]:
    """Real crops from another lab (BMP, yellow backgrounds, the cell filling the frame)."""
    root = pbc_dev.parent / "crosslab_dev"
    if not root.exists():
        pytest.skip(f"{root} not found")
    return sorted(root.glob("*/*.bmp"))[::15]


@pytest.mark.parametrize("crop", sorted(CROPS))
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("source", ["pbc_dev", "crosslab_dev"])
def test_matches_training_on_real_images(real: list[Path], crosslab: list[Path], size: int, crop: str,
                                         source: str, record_property) -> None:
    diffs = []
    for p in (real if source == "pbc_dev" else crosslab):
        a, t = app_input(p, size, crop), train_input(p, size, crop)
        assert a.shape == t.shape == (1, 3, size, size) and a.dtype == np.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        diffs.append(float(np.abs(a - t).max()))
    worst = max(diffs)
    record_property(f"max_abs_diff_{source}_{crop}_{size}px", worst)
    print(f"\n{len(diffs)} real {source} images, {crop} crop at {size}px: max |app - train| = {worst:.3g}")
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
    # what the app classifies: Preprocessing.box_for, on the decoded photo (classifier.py)
    assert Preprocessing(input_size=64).box_for(Image.new("RGB", (w, h))) == box


@pytest.mark.parametrize("source", ["pbc_dev", "crosslab_dev"])
def test_cell_crop_finds_the_cell(real: list[Path], crosslab: list[Path], source: str) -> None:
    """The nucleus-centred square lies on the stained cell: darker (more dye) at its centre than the field."""
    from cellcore.preprocess import cell_box

    for p in (real if source == "pbc_dev" else crosslab)[:12]:
        rgb = train_data.load_rgb(p)
        left, top, right, bottom = cell_box(rgb)
        side = right - left
        assert side == bottom - top and side >= 0.2 * min(rgb.size)
        red = np.asarray(rgb, dtype=np.float32)[:, :, 0]
        cx, cy, r = (left + right) // 2, (top + bottom) // 2, max(2, side // 8)
        centre = red[max(0, cy - r):cy + r, max(0, cx - r):cx + r].mean()
        assert centre < np.percentile(red, 50), f"{p}: crop centre is not on stained material"


def test_mobile_app_stays_torch_free() -> None:
    """The phone build has no torch: nothing in mobile_app or cellcore may import torch, train or export at module level."""
    import ast

    import mobile_app

    pys = [*Path(imaging.__file__).parent.glob("*.py"), *Path(mobile_app.__file__).parent.glob("*.py")]
    assert len(pys) > 10
    for py in pys:
        tree = ast.parse(py.read_text())
        for node in tree.body:  # module level only; runtimes.py imports torch lazily inside ExecuTorchDesktop
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in ("torch", "train", "export", "timm"), f"{py.name} imports {n}"
