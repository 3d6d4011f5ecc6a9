"""The shared torch-free core's file helpers and manifest validator: one set of tests for the one copy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellcore.files import atomic_write, atomic_write_text, sha256_of
from cellcore.manifest import ArtifactMismatch, ManifestError, artifact_path, read_manifest, write_manifest


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    atomic_write_text(target, "old")

    def half_then_crash(fh) -> None:
        fh.write(b"new but incomp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_sha256_of_a_folder_covers_names_and_bytes(tmp_path: Path) -> None:
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data" / "weights.bin").write_bytes(b"\x00\x01")
    (pkg / "Manifest.json").write_text("{}")
    digest = sha256_of(pkg)
    (pkg / "Data" / "weights.bin").write_bytes(b"\x00\x02")
    assert sha256_of(pkg) != digest
    (pkg / "Data" / "weights.bin").write_bytes(b"\x00\x01")
    assert sha256_of(pkg) == digest
    (pkg / "Data" / "weights.bin").rename(pkg / "Data" / "w.bin")  # same bytes, another name
    assert sha256_of(pkg) != digest


def _manifest(tmp_path: Path) -> dict:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx bytes")
    return {"schema_version": 1, "classes": ["a", "b"], "input": {"name": "image"},
            "preprocessing": {"input_size": 64}, "output": {"name": "logits"}, "uncertainty": {"threshold": None},
            "artifacts": [{"file": "model.onnx", "format": "onnx", "sha256": sha256_of(model)}]}


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(schema_version=2), "schema_version 2 is not supported"),
    (lambda m: m.pop("uncertainty"), "no 'uncertainty'"),
    (lambda m: m.update(classes=["only"]), "at least two"),
    (lambda m: m["preprocessing"].update(input_size=16), "input_size must be an integer >= 32"),
    (lambda m: m["preprocessing"].update(resize="stretch"), "resize 'stretch' is not supported"),
    (lambda m: m["uncertainty"].update(threshold=1.5), "threshold must be a number in 0..1 or null"),
    (lambda m: m["artifacts"][0].update(file="../model.onnx"), "plain file name"),
    (lambda m: m["artifacts"][0].update(format="tflite"), "format 'tflite' is unknown"),
])
def test_manifest_validator_names_the_problem(tmp_path: Path, change, message: str) -> None:
    m = _manifest(tmp_path)
    write_manifest(m, tmp_path)
    assert read_manifest(tmp_path)["classes"] == ["a", "b"]
    change(m)
    write_manifest(m, tmp_path)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_manifest_refuses_nan_and_changed_files(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    m["uncertainty"]["temperature"] = float("nan")
    with pytest.raises(ValueError):  # NaN is not JSON: never written for the app's reader to choke on
        write_manifest(m, tmp_path)
    m["uncertainty"]["temperature"] = 1.0
    write_manifest(m, tmp_path)
    entry = read_manifest(tmp_path)["artifacts"][0]
    assert artifact_path(tmp_path, entry) == tmp_path / "model.onnx"
    (tmp_path / "model.onnx").write_bytes(b"other bytes")
    with pytest.raises(ArtifactMismatch, match="does not match the manifest"):
        artifact_path(tmp_path, entry)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ArtifactMismatch, match="missing"):
        artifact_path(tmp_path, entry)
    assert json.loads((tmp_path / "manifest.json").read_text())["uncertainty"]["temperature"] == 1.0
