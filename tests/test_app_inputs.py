"""Bad photos and bad model folders give their defined, readable error (library, classifier and CLI); no crash."""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable

import pytest

from tests.fixtures_app import images as img
from tests.fixtures_app.exports import artifact_file, copy_export, edit_manifest
from cellcore import imaging
from cellcore.preprocess import Preprocessing
from mobile_app import cli
from mobile_app.classifier import UNCERTAIN_MESSAGE, CellClassifier
from mobile_app.errors import BadImageError, ManifestError, ModelError, ModelIntegrityError


@pytest.fixture(scope="module")
def sample(pbc_dev: Path) -> Path:
    return img.real_images(pbc_dev, per_class=1)[0]


@pytest.fixture(scope="module")
def classifier(smoke_export: Path) -> CellClassifier:
    clf = CellClassifier(smoke_export, fmt="onnx", platform="desktop")
    clf.load()
    return clf


# ----------------------------------------------------------------------------- photos that must be refused

BAD_PHOTOS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing file": (lambda d, s: d / "nope.jpg", "file not found"),
    "folder": (lambda d, s: d, "is a folder"),
    "text file named .jpg": (lambda d, s: _write(d / "notes.jpg", b"patient notes, not a picture\n"), "not an image"),
    "empty file": (lambda d, s: _write(d / "empty.png", b""), "not an image"),
    "truncated JPEG": (lambda d, s: img.truncated_copy(s, d / "cut.jpg"), "truncated"),
    "1x1 image": (lambda d, s: _save_blank(d / "dot.png", (1, 1)), "too small (1x1 px)"),
    "31 px wide": (lambda d, s: _save_blank(d / "strip.png", (31, 400)), "too small"),
    "decompression bomb": (lambda d, s: img.png_header_only(d / "bomb.png", 20000, 20000), "too large"),
    "broken TIFF": (lambda d, s: _write(d / "scan.tif", b"II*\x00garbage"), "cannot decode TIFF"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save_blank(path: Path, size: tuple[int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 180, 190)).save(path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_PHOTOS))
def test_bad_photo_is_refused_with_its_reason(case: str, tmp_path: Path, sample: Path,
                                              classifier: CellClassifier) -> None:
    make, expected = BAD_PHOTOS[case]
    path = make(tmp_path, sample)
    with pytest.raises(BadImageError) as info:
        imaging.decode(path)
    assert expected in info.value.reason
    with pytest.raises(BadImageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        classifier.classify(path)  # the UI and CLI path: same error, classifier still usable
    assert classifier.classify(sample).label in classifier.manifest.classes


def test_cli_reports_each_bad_file_and_fails_only_then(tmp_path: Path, sample: Path, smoke_export: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    bad = [BAD_PHOTOS[c][0](tmp_path, sample) for c in ("text file named .jpg", "1x1 image", "truncated JPEG")]
    rc = cli.main(["classify", "--model-dir", str(smoke_export), str(sample), *map(str, bad)])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert rc == 1 and len(lines) == 4, out
    file, label, prob, *rest = lines[0].split("\t")
    assert file == str(sample) and 0.0 <= float(prob) <= 1.0
    threshold = json.loads((smoke_export / "manifest.json").read_text())["uncertainty"]["threshold"]
    assert rest == ([UNCERTAIN_MESSAGE] if threshold is None or float(prob) < threshold else [])
    for line, path, reason in zip(lines[1:], bad, ("not an image", "too small", "truncated")):
        assert line.startswith(f"{path}\terror: ") and reason in line
    assert "3 of 4 image(s) could not be classified" in out.err
    assert cli.main(["classify", "--model-dir", str(smoke_export), str(sample)]) == 0


# ----------------------------------------------------------------------------- unusual photos that must work

@pytest.fixture(scope="module")
def huge_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("huge")
    return {"JPEG": img.huge(d / "huge.jpg", 10000, "JPEG"), "PNG": img.huge(d / "huge.png", 10000, "PNG")}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_10000px_photo_is_downscaled_while_decoding(fmt: str, huge_files: dict[str, Path],
                                                    classifier: CellClassifier) -> None:
    decoded = imaging.decode(huge_files[fmt])
    assert decoded.original_size == (10000, 10000)
    assert decoded.rgb.width * decoded.rgb.height <= imaging.MAX_DECODE_PIXELS  # draft (JPEG) / reduce (PNG)
    # the square the app reports (classifier.py): box_for on the downscaled photo, in the file's own pixels
    assert decoded.to_original(Preprocessing(input_size=64).box_for(decoded.rgb)) == pytest.approx((0, 0, 10000, 10000), abs=8)
    pred = classifier.classify(huge_files[fmt])
    assert pred.image_size == (10000, 10000) and pred.label in classifier.manifest.classes


@pytest.mark.parametrize("encoding", ["grayscale", "rgba", "gray16_tiff", "rgb16_tiff", "cmyk_jpeg"])
def test_unusual_encodings_classify(encoding: str, tmp_path: Path, sample: Path,
                                    classifier: CellClassifier) -> None:
    if encoding == "rgb16_tiff":
        pytest.importorskip("tifffile")
    pred = classifier.classify(img.ENCODINGS[encoding](sample, tmp_path / encoding))
    assert pred.label in classifier.manifest.classes and abs(sum(pred.probabilities) - 1) < 1e-4


# ----------------------------------------------------------------------------- model folders that must be refused

def _onnx(d: Path) -> Path:
    return artifact_file(d, "onnx", "fp32")


def _tamper(d: Path) -> None:
    data = bytearray(_onnx(d).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _onnx(d).write_bytes(bytes(data))


def _set(key: str, value: object) -> Callable[[Path], None]:
    def change(m: dict) -> None:
        if key == "threshold":
            m["uncertainty"]["threshold"] = value
        elif value is _DROP:
            m.pop(key)
        else:
            m[key] = value
    return lambda d: edit_manifest(d, change)


_DROP = object()

BAD_MODELS: dict[str, tuple[Callable[[Path], None], type[ModelError], str]] = {
    "tampered model file": (_tamper, ModelIntegrityError, "does not match the manifest"),
    "model file missing": (lambda d: _onnx(d).unlink(), ModelIntegrityError, "model file missing"),
    "schema version 2": (_set("schema_version", 2), ManifestError, "schema_version 2 is not supported"),
    "schema version missing": (_set("schema_version", _DROP), ManifestError, "schema_version None"),
    "schema version '1' as text": (_set("schema_version", "1"), ManifestError, "is not supported"),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{oops"), ManifestError, "not valid JSON"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), ManifestError, "no model found"),
    "threshold out of range": (_set("threshold", 5), ManifestError, "uncertainty.threshold"),
    "no classes": (_set("classes", []), ManifestError, "'classes'"),
}


@pytest.fixture
def model_copy(smoke_export: Path, tmp_path: Path) -> Path:
    """manifest + the fp32 ONNX model only, safe to damage."""
    return copy_export(smoke_export, tmp_path / "export", [artifact_file(smoke_export, "onnx")])


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_folder_is_refused(case: str, model_copy: Path, sample: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    damage, error, expected = BAD_MODELS[case]
    damage(model_copy)
    clf = CellClassifier(model_copy, fmt="onnx", platform="desktop")
    with pytest.raises(error, match=expected):
        clf.load()
    assert not clf.loaded
    rc = cli.main(["classify", "--model-dir", str(model_copy), "--format", "onnx", str(sample)])
    out = capsys.readouterr()
    assert rc == 2 and out.out == "" and expected in out.err and "Traceback" not in out.err


def test_format_this_device_cannot_run_is_refused(model_copy: Path) -> None:
    with pytest.raises(ManifestError, match="cannot run coreml"):
        CellClassifier(model_copy, fmt="coreml", platform="desktop").load()
    edit_manifest(model_copy, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["format"] != "coreml"]))
    with pytest.raises(ManifestError, match="lists no coreml model"):
        CellClassifier(model_copy, platform="ios").load()
