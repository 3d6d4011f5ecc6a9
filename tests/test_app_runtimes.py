"""Phone runtimes (ORT Android, ExecuTorch Android, Core ML): call sequences against fakes, and what is real.

The fakes (tests/fixtures_app) compute with the desktop engines on the same model file, so these tests
check the app's call sequence and its handling of inputs and outputs, not the phone runtimes themselves.
What can be checked for real here is: the Java/ObjC class and method names against the runtimes'
documented APIs (tests/test_app_android.py), and the exported Core ML package's spec. Nothing ran on a phone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_app import images as img
from tests.fixtures_app.exports import artifact_file, copy_export, edit_manifest
from tests.fixtures_app.fake_jnius import FakeJVM
from tests.fixtures_app.fake_pyobjus import FakeObjC, make_fake_mlpackage
from mobile_app import runtimes
from mobile_app.classifier import CellClassifier
from mobile_app.errors import RuntimeUnavailableError
from cellcore.files import sha256_of

N_IMAGES = 4

ORT_ANDROID_SEQUENCE = [
    "autoclass java.nio.FloatBuffer", "autoclass java.util.HashMap", "autoclass ai.onnxruntime.OnnxTensor",
    "autoclass ai.onnxruntime.OrtEnvironment", "OrtEnvironment.getEnvironment", "OrtEnvironment.createSession",
    "FloatBuffer.wrap", "OnnxTensor.createTensor", "HashMap.put", "OrtSession.run", "Result.get",
    "cast ai.onnxruntime.OnnxTensor",
]
ET_ANDROID_SEQUENCE = [
    "autoclass org.pytorch.executorch.Tensor", "autoclass org.pytorch.executorch.EValue",
    "autoclass org.pytorch.executorch.Module", "Module.load", "Tensor.allocateFloatBuffer", "FloatBuffer.put",
    "Tensor.fromBlob", "EValue.from", "Module.forward", "EValue.toTensor", "Tensor.getDataAsFloatArray",
]
COREML_SEQUENCE = [
    "load_framework /System/Library/Frameworks/CoreML.framework", "autoclass NSURL", "autoclass MLModel",
    "autoclass MLFeatureValue", "autoclass MLDictionaryFeatureProvider", "NSURL.fileURLWithPath_",
    "MLModel.compileModelAtURL_error_", "MLModel.modelWithContentsOfURL_error_", "NSURL.fileURLWithPath_",
    "MLFeatureValue.featureValueWithImageAtURL_pixelsWide_pixelsHigh_pixelFormatType_options_error_",
    "MLDictionaryFeatureProvider.alloc", "MLDictionaryFeatureProvider.initWithDictionary_error_",
    "MLModel.predictionFromFeatures_error_", "featureValueForName_", "MLFeatureValue.dictionaryValue",
]


@pytest.fixture(scope="module")
def photos(pbc_dev: Path) -> list[Path]:
    return img.real_images(pbc_dev, per_class=1)[:N_IMAGES]


@pytest.fixture(scope="module")
def desktop_probs(smoke_export: Path, photos: list[Path]) -> list[list[float]]:
    clf = CellClassifier(smoke_export, fmt="onnx", platform="desktop")
    return [clf.classify(p).probabilities for p in photos]


def in_order(calls: list[str], expected: list[str]) -> bool:
    """`expected` appears in `calls` as a subsequence (other calls may sit between)."""
    it = iter(calls)
    return all(any(c == e for c in it) for e in expected)


@pytest.mark.parametrize("fmt,sequence,closed", [
    ("onnx", ORT_ANDROID_SEQUENCE, ["Result", "OnnxTensor", "OrtSession"]),
    ("executorch", ET_ANDROID_SEQUENCE, ["Module"]),
])
def test_android_call_sequence_against_a_fake_jvm(fmt: str, sequence: list[str], closed: list[str], smoke_export: Path,
                                         photos: list[Path], desktop_probs: list[list[float]]) -> None:
    if fmt == "executorch":
        pytest.importorskip("executorch.runtime")
        if not list(smoke_export.glob("*.pte")):
            pytest.skip("export has no .pte")
    jvm = FakeJVM()
    clf = CellClassifier(smoke_export, fmt=fmt, platform="android", bridge=jvm.bridge())
    for path, expected in zip(photos, desktop_probs):
        pred = clf.classify(path)
        np.testing.assert_allclose(pred.probabilities, expected, atol=1e-5)
    assert in_order(jvm.calls, sequence), jvm.calls
    assert clf.load().name == f"{'onnxruntime' if fmt == 'onnx' else 'executorch'}-android"
    clf.close()
    assert set(closed) <= set(jvm.closed)


def test_android_falls_back_to_executorch_without_onnx_runtime(smoke_export: Path, photos: list[Path],
                                                              desktop_probs: list[list[float]]) -> None:
    pytest.importorskip("executorch.runtime")
    jvm = FakeJVM(missing=("ai.onnxruntime.OrtEnvironment",))  # onnxruntime-android left out of the build
    clf = CellClassifier(smoke_export, platform="android", bridge=jvm.bridge())
    assert clf.load().name == "executorch-android" and clf.artifact.format == "executorch"
    np.testing.assert_allclose(clf.classify(photos[0]).probabilities, desktop_probs[0], atol=1e-5)
    with pytest.raises(RuntimeUnavailableError, match="ONNX Runtime Android cannot load"):
        CellClassifier(smoke_export, fmt="onnx", platform="android", bridge=jvm.bridge()).load()  # no fallback


def coreml_export(smoke_export: Path, dst: Path) -> Path:
    """The smoke export with its Core ML entry exactly as the exporter wrote it, but the package replaced by
    one whose fake runtime computes with the ONNX file (Core ML cannot run off macOS)."""
    onnx = artifact_file(smoke_export, "onnx", "fp32")
    copy_export(smoke_export, dst, [])
    manifest = json.loads((dst / "manifest.json").read_text())
    real = next(a for a in json.loads((smoke_export / "manifest.json").read_text())["artifacts"]
                if a["format"] == "coreml")
    pkg = make_fake_mlpackage(dst / real["file"], onnx, manifest["classes"])
    entry = {**real, "size_bytes": 0, "sha256": sha256_of(pkg)}
    edit_manifest(dst, lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["format"] != "coreml"] + [entry]))
    return dst


def test_app_reads_the_real_coreml_package_by_its_spec(smoke_export: Path) -> None:
    """What the iOS runtime will ask the exported .mlpackage for, checked against its real spec (readable on Linux):
    the input it fills, its image size and scale, the output it reads and the class order."""
    ct = pytest.importorskip("coremltools")
    from export.runtimes import _labels
    from mobile_app.manifest import load_manifest

    m = load_manifest(smoke_export)
    art = next(a for a in m.artifacts if a.format == "coreml")
    spec = ct.utils.load_spec(str(art.path))
    inputs = {i.name: i.type for i in spec.description.input}
    outputs = {o.name: o.type for o in spec.description.output}
    image = inputs[art.input_name].imageType  # KeyError here: the app would fill an input the model lacks
    assert (image.width, image.height) == (m.input_size, m.input_size)
    assert image.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert outputs[art.output_name].WhichOneof("Type") == "dictionaryType"  # probabilities by class label
    assert spec.description.predictedFeatureName == m.raw["artifacts"][m.artifacts.index(art)]["label_output"]
    assert _labels(spec) == m.classes  # the dictionary's keys are the manifest's classes, in its order
    assert "0.0039215" in str(spec.mlProgram)  # the 1/255 image scale: the app passes 0..255 pixels


def test_coreml_call_sequence_against_a_fake_runtime(smoke_export: Path, photos: list[Path], desktop_probs: list[list[float]],
                                        tmp_path: Path) -> None:
    export = coreml_export(smoke_export, tmp_path / "export")
    objc = FakeObjC()
    clf = CellClassifier(export, platform="ios", bridge=objc.bridge())
    for path, expected in zip(photos, desktop_probs):
        pred = clf.classify(path)
        # the S x S crop travels as a PNG: lossless, so probabilities match the float path
        np.testing.assert_allclose(pred.probabilities, expected, atol=1e-5)
    assert clf.artifact is not None and clf.artifact.format == "coreml"
    assert in_order(objc.calls, COREML_SEQUENCE), objc.calls


def test_coreml_package_is_checked_like_any_model(smoke_export: Path, tmp_path: Path) -> None:
    export = coreml_export(smoke_export, tmp_path / "export")
    next(export.glob("*.mlpackage")).joinpath("Manifest.json").write_text("{}")  # changed after export
    from mobile_app.errors import ModelIntegrityError

    with pytest.raises(ModelIntegrityError, match="does not match the manifest"):
        CellClassifier(export, platform="ios", bridge=FakeObjC().bridge()).load()


@pytest.mark.parametrize("platform,fmt,message", [
    ("android", "onnx", "pyjnius is not available"),
    ("android", "executorch", "pyjnius is not available"),
])
def test_phone_runtime_without_its_bridge_says_so(smoke_export: Path, platform: str, fmt: str, message: str) -> None:
    pytest.importorskip("mobile_app")
    try:
        import jnius  # noqa: F401
        pytest.skip("pyjnius is installed here")
    except ImportError:
        pass
    if fmt == "executorch" and not list(smoke_export.glob("*.pte")):
        pytest.skip("export has no .pte")
    with pytest.raises(RuntimeUnavailableError, match=message):
        CellClassifier(smoke_export, fmt=fmt, platform=platform).load()


def test_android_load_failure_is_a_clear_error(smoke_export: Path, tmp_path: Path) -> None:
    export = copy_export(smoke_export, tmp_path / "export", [])
    onnx = artifact_file(export, "onnx", "fp32")
    onnx.write_bytes(b"not a model")  # consistent manifest, unusable file: the runtime itself refuses

    def relist(m: dict) -> None:
        for a in m["artifacts"]:
            if a["file"] == onnx.name:
                a["sha256"] = sha256_of(onnx)

    edit_manifest(export, relist)
    with pytest.raises(RuntimeUnavailableError, match="ONNX Runtime Android cannot load"):
        CellClassifier(export, fmt="onnx", platform="android", bridge=FakeJVM().bridge()).load()


@pytest.mark.parametrize("env,expected", [
    ({}, "desktop"), ({"KIVY_BUILD": "android"}, "android"), ({"P4A_BOOTSTRAP": "sdl2"}, "android"),
    ({"ANDROID_ARGUMENT": "/data/app"}, "android"), ({"KIVY_BUILD": "ios"}, "ios"),
])
def test_platform_detection(env: dict, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("KIVY_BUILD", "P4A_BOOTSTRAP", "ANDROID_ARGUMENT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runtimes.detect_platform() == expected
    assert runtimes.PLATFORM_FORMATS[expected]
