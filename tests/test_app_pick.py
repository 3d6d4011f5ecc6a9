"""Picking one cell of a field: the square's geometry on real cells, and that a picked square reaches the model
as Preprocessing(cut-out), headless and through the classifier API. Nothing trains: tiny hand-built ONNX model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcore import imaging
from cellcore.preprocess import (MIN_BOX_SIDE, Preprocessing, box_from_bounds, cell_box, crop_square, square_bounds,
                                 suggest_box)
from mobile_app import cli
from mobile_app.classifier import CellClassifier
from mobile_app.errors import BoxError
from tests.fixtures_app import images as img
from tests.fixtures_app.exports import edit_manifest
from tests.fixtures_app.tiny_export import SIZE, tiny_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

POLICIES = ("center_square_crop_then_resize", "cell_square_crop_then_resize")
TAPS = [(0, 0), (40, -30), (-50, 45)]  # on the cell's photo: its centre and two points of its cytoplasm or edge


@pytest.fixture(scope="module")
def field(pbc_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[img.PastedCell]]:
    """1200x900 light-pink field holding a real lymphocyte, neutrophil and eosinophil at known places."""
    return img.cell_field(pbc_dev, tmp_path_factory.mktemp("field") / "field.png")


@pytest.fixture(scope="module")
def field_rgb(field: tuple[Path, list[img.PastedCell]]) -> np.ndarray:
    return np.asarray(imaging.decode(field[0]).rgb)  # [900, 1200, 3] uint8


def nucleus(cell: img.PastedCell) -> tuple[float, float, float, float]:
    """The stained nucleus of a pasted photo (cell_box at fill 1: its extent), in field pixels."""
    with Image.open(cell.source) as im:
        l, t, r, b = cell_box(im.convert("RGB"), 1.0)
    return (cell.left + l, cell.top + t, cell.left + r, cell.top + b)


def export_with(tmp_path: Path, resize: str) -> Path:
    export = tiny_export(tmp_path / "export")
    edit_manifest(export, lambda m: m["preprocessing"].update(resize=resize))
    return export


def spy_on_runtime(clf: CellClassifier) -> list[np.ndarray]:
    """Record every input the runtime is given (the runtime still computes: the result is real)."""
    seen: list[np.ndarray] = []
    runtime = clf.load()
    run = runtime.run

    def recording(x: np.ndarray) -> np.ndarray:
        seen.append(x.copy())
        return run(x)

    runtime.run = recording  # type: ignore[method-assign]
    return seen


def model_input(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """What training feeds the model for a photo with these pixels: [1, 3, S, S] float32 in 0..1."""
    square = np.asarray(prep.apply(Image.fromarray(pixels)), dtype=np.uint8)
    return (square.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]


# ----------------------------------------------------------------------------- geometry

def test_the_cut_out_is_the_pasted_cell(field: tuple[Path, list[img.PastedCell]], field_rgb: np.ndarray) -> None:
    path, cells = field
    rgb = Image.fromarray(field_rgb)
    for cell in cells:
        l, t, r, b = cell.square
        box = box_from_bounds(cell.square)
        assert square_bounds(box, *rgb.size) == cell.square
        with Image.open(cell.source) as im:
            src = np.asarray(im.convert("RGB"))
        top = (cell.height - (b - t)) // 2
        np.testing.assert_array_equal(np.asarray(crop_square(rgb, box)), src[top:top + b - t, :])


@pytest.mark.parametrize("box,bounds", [
    ((600, 450, 300), (450, 300, 750, 600)),  # inside: as asked
    ((600.4, 450.6, 299.6), (450, 301, 750, 601)),  # fractions round to whole pixels
    ((10, 20, 100), (0, 0, 100, 100)),  # runs off the top-left: moved inside, same size
    ((1195, 899, 100), (1100, 800, 1200, 900)),  # off the bottom-right
    ((600, 450, 5000), (150, 0, 1050, 900)),  # larger than the photo: the short side
    ((600, 450, 3), (592, 442, 608, 458)),  # tiny: MIN_BOX_SIDE
])
def test_a_square_past_the_edge_is_moved_inside_not_padded(box: tuple[float, float, float],
                                                           bounds: tuple[int, int, int, int]) -> None:
    assert square_bounds(box, 1200, 900) == bounds
    l, t, r, b = bounds
    assert r - l == b - t and 0 <= l and 0 <= t and r <= 1200 and b <= 900 and r - l >= MIN_BOX_SIDE


@pytest.mark.parametrize("box", [(1.0, 2.0, 0.0), (1.0, 2.0, -5.0), (float("nan"), 2.0, 10.0), (1, 2, float("inf"))])
def test_a_box_that_is_no_square_is_refused(box: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="positive side"):
        square_bounds(box, 1200, 900)


@pytest.mark.parametrize("tap", TAPS)
def test_suggest_box_centres_on_the_tapped_real_cell(field: tuple[Path, list[img.PastedCell]],
                                                    field_rgb: np.ndarray, tap: tuple[int, int]) -> None:
    _, cells = field
    rgb = Image.fromarray(field_rgb)
    for cell in cells:
        x, y = cell.centre[0] + tap[0], cell.centre[1] + tap[1]
        cx, cy, side = suggest_box(rgb, x, y)
        nl, nt, nr, nb = nucleus(cell)
        # centred on this cell's nucleus, the whole nucleus inside, framed about as the 360 px training photos
        assert abs(cx - (nl + nr) / 2) < 25 and abs(cy - (nt + nb) / 2) < 25, (cell.cls, cx, cy)
        half = side / 2
        assert cx - half <= nl and nr <= cx + half and cy - half <= nt and nb <= cy + half, (cell.cls, side)
        assert 0.6 * 360 <= side <= 1.4 * 360, (cell.cls, side)
        for other in cells:  # and no other cell's nucleus
            if other is not cell:
                ox, oy = (nucleus(other)[0] + nucleus(other)[2]) / 2, (nucleus(other)[1] + nucleus(other)[3]) / 2
                assert not (abs(ox - cx) < half and abs(oy - cy) < half), (cell.cls, other.cls)


def test_suggest_box_with_nothing_stained_near_the_tap_centres_on_it(field_rgb: np.ndarray) -> None:
    assert suggest_box(Image.fromarray(field_rgb), 1150, 860) == (1150.0, 860.0, 450.0)


# ----------------------------------------------------------------------------- the classifier

@pytest.mark.parametrize("resize", POLICIES)
@pytest.mark.parametrize("sized", [True, False], ids=["x,y,size", "x,y"])
def test_a_picked_square_reaches_the_model_as_preprocessing_of_the_cut_out(
        field: tuple[Path, list[img.PastedCell]], field_rgb: np.ndarray, resize: str, sized: bool,
        tmp_path: Path) -> None:
    path, cells = field
    clf = CellClassifier(export_with(tmp_path, resize), fmt="onnx", platform="desktop")
    seen = spy_on_runtime(clf)
    prep = Preprocessing(input_size=SIZE, resize=resize)
    assert clf.manifest.preprocessing == prep
    for cell in cells:
        x, y = cell.centre
        pred = clf.classify(path, box=(x, y, 300.0) if sized else (x, y, None))
        bounds = square_bounds((x, y, 300.0) if sized else suggest_box(Image.fromarray(field_rgb), x, y), 1200, 900)
        l, t, r, b = bounds
        cut = field_rgb[t:b, l:r]  # the field's own pixels, cut by numpy: independent of crop_square
        np.testing.assert_array_equal(seen[-1], model_input(cut, prep))
        assert pred.box == box_from_bounds(bounds) and pred.image_size == (1200, 900)
        ml, mt, mr, mb = prep.box_for(Image.fromarray(cut))  # the model's own crop, inside the cut-out
        assert pred.crop_box == (l + ml, t + mt, l + mr, t + mb)
        if resize == POLICIES[0]:
            assert pred.crop_box == bounds
        assert pred.to_dict()["box"] == list(pred.box)


def test_a_cell_picked_in_the_field_gets_what_its_own_photo_gets(field: tuple[Path, list[img.PastedCell]],
                                                                 tmp_path: Path) -> None:
    """The square around a pasted photo's centred square holds exactly the pixels that photo alone is classified
    on, so the model gets the same input and gives the same answer. Same to the bit except the first and last
    rows: inside the 360x363 photo Pillow's bilinear filter reads the row or two past the centred square, which
    the cut-out (like any photo) does not have."""
    path, cells = field
    clf = CellClassifier(tiny_export(tmp_path / "export"), fmt="onnx", platform="desktop")
    seen = spy_on_runtime(clf)
    for cell in cells:
        alone = clf.classify(cell.source)
        picked = clf.classify(path, box=box_from_bounds(cell.square))
        clf.classify(path)  # the whole field, default crop
        x_alone, x_picked, x_whole = seen[-3:]
        np.testing.assert_array_equal(x_picked[:, :, 1:-1], x_alone[:, :, 1:-1])
        assert np.abs(x_picked - x_alone).max() < 0.05
        assert picked.label == alone.label
        np.testing.assert_allclose(picked.probabilities, alone.probabilities, atol=1e-3)
        assert np.abs(x_whole - x_alone).max() > 0.2  # the field's default crop is another picture


def test_a_huge_photo_takes_and_gives_the_square_in_its_own_pixels(
        field: tuple[Path, list[img.PastedCell]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, cells = field
    monkeypatch.setattr(imaging, "MAX_DECODE_PIXELS", 300_000)  # the 1.08 MP field now decodes at half size
    decoded = imaging.decode(path)
    assert decoded.scale == 0.5 and decoded.original_size == (1200, 900)
    clf = CellClassifier(tiny_export(tmp_path / "export"), fmt="onnx", platform="desktop")
    seen = spy_on_runtime(clf)
    box = (*cells[1].centre, 300.0)  # original pixels
    pred = clf.classify(path, box=box)
    assert pred.box == (880.0, 302.0, 300.0) and pred.image_size == (1200, 900)
    half = np.asarray(decoded.rgb)[76:226, 365:515]  # the same square in the decoded (half-size) pixels
    np.testing.assert_array_equal(seen[-1], model_input(half, Preprocessing(SIZE)))
    sx, sy, side = clf.suggest(path, *cells[1].centre)
    assert abs(sx - cells[1].centre[0]) < 40 and abs(sy - cells[1].centre[1]) < 40 and 200 < side < 500


@pytest.mark.parametrize("box,message", [
    ((1300.0, 100.0, 200.0), "outside the 1200x900 px photo"),
    ((-1.0, 100.0, None), "outside"),
    ((100.0, 100.0, 0.0), "positive number"),
])
def test_a_square_outside_the_photo_is_a_message(field: tuple[Path, list[img.PastedCell]], tmp_path: Path,
                                                 box: tuple, message: str) -> None:
    clf = CellClassifier(tiny_export(tmp_path / "export"), fmt="onnx", platform="desktop")
    with pytest.raises(BoxError, match=message):
        clf.classify(field[0], box=box)


# ----------------------------------------------------------------------------- headless: classify --box

def test_classify_box_on_the_command_line(field: tuple[Path, list[img.PastedCell]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    path, cells = field
    export = tiny_export(tmp_path / "export")
    clf = CellClassifier(export, fmt="onnx", platform="desktop")
    for cell in cells:
        x, y, side = box_from_bounds(cell.square)
        assert cli.main(["classify", "--json", "--model-dir", str(export), "--box", f"{x:g},{y:g},{side:g}",
                         str(path)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["box"] == [x, y, side] and out["crop_box"] == list(cell.square)
        assert out["label"] == clf.classify(cell.source).label  # that cell's answer, not the field's
        # without a size: what a tap there picks in the app
        assert cli.main(["classify", "--model-dir", str(export), "--box", f"{x:g},{y:g}", str(path)]) == 0
        fields = capsys.readouterr().out.strip().split("\t")
        suggested = clf.suggest(path, x, y)
        assert fields[0] == str(path) and fields[3] == "box " + ",".join(f"{v:.1f}".removesuffix(".0")
                                                                         for v in suggested)


@pytest.mark.parametrize("arg", ["12", "1,2,3,4", "a,b", "1,2,-5", "1,2,nan", "1,2,0"])
def test_a_malformed_box_argument_is_refused(arg: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["classify", "--box", arg, str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "x,y or x,y,size" in capsys.readouterr().err


def test_a_box_outside_one_photo_fails_that_photo_only(field: tuple[Path, list[img.PastedCell]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 150), (200, 180, 190)).save(small)
    export = tiny_export(tmp_path / "export")
    assert cli.main(["classify", "--model-dir", str(export), "--box", "500,400,300", str(field[0]), str(small)]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().split("\n")
    assert lines[0].startswith(f"{field[0]}\t") and "\tbox 500,400,300" in lines[0]
    assert lines[1] == f"{small}\terror: the square's centre (500, 400) is outside the 200x150 px photo"
    assert "1 of 2" in err
