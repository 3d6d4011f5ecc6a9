"""The Android runtime versions the phone build pins, and what each can read: the one place they are written in Python.

buildozer.spec's `android.gradle_dependencies` must name exactly GRADLE_DEPENDENCIES (a test compares them),
and `python -m mobile_app bundle` refuses a model file these runtimes cannot read, so a mismatch shows up
on the desktop instead of as a load failure on the phone. Torch-free: the `.pte` header is read as bytes,
an `.onnx` with the `onnx` package where installed, else with a minimal protobuf reader.

Where the numbers come from (checked against public sources, none of it run on a phone):
- executorch-android 1.5.1 is the release of the executorch 1.5.1 the exporter pins (pyproject.toml); Maven
  Central has no 1.5.0. ExecuTorch only promises that a runtime reads programs of its own release and older,
  so the runtime must not be older than the exporter. Its program schema (schema/program.fbs) declares
  `file_identifier "ET12"`, which executorch 1.5.1 writes at bytes 4..8 of every .pte.
- onnxruntime-android 1.24.2 is built with ONNX 1.20.1 (onnxruntime PR #26579), i.e. IR version 13 and
  ai.onnx opset 25 at most; ONNX Runtime refuses a model of a newer IR version or opset at load time.
"""
from __future__ import annotations

import logging
from pathlib import Path

from mobile_app.errors import ModelError

log = logging.getLogger(__name__)

EXECUTORCH_ANDROID = "org.pytorch:executorch-android"
EXECUTORCH_ANDROID_VERSION = "1.5.1"
PTE_IDENTIFIERS = (b"ET12",)  # flatbuffer file identifiers (bytes 4..8) the pinned ExecuTorch runtime reads

ONNXRUNTIME_ANDROID = "com.microsoft.onnxruntime:onnxruntime-android"
ONNXRUNTIME_ANDROID_VERSION = "1.24.2"
ORT_MAX_IR_VERSION = 13  # ONNX 1.20.1 inside onnxruntime 1.24
ORT_MAX_OPSET = 25  # ai.onnx domain

GRADLE_DEPENDENCIES = (f"{ONNXRUNTIME_ANDROID}:{ONNXRUNTIME_ANDROID_VERSION}",
                       f"{EXECUTORCH_ANDROID}:{EXECUTORCH_ANDROID_VERSION}")


class UnreadableModelError(ModelError):
    """The model file was written for a newer runtime than the one the Android build pins."""


# ----------------------------------------------------------------------------- ExecuTorch .pte

def pte_identifier(path: Path | str) -> bytes:
    """The 4-byte flatbuffer file identifier of a .pte (bytes 4..8; bytes 0..4 are the root table offset)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelError(f"cannot read {Path(path).name}: {exc}") from exc
    if len(head) < 8:
        raise UnreadableModelError(f"{Path(path).name} is too short to be an ExecuTorch program ({len(head)} bytes)")
    return head[4:8]


def check_pte(path: Path | str) -> bytes:
    """Refuse a .pte whose identifier the pinned executorch-android cannot read; returns the identifier."""
    ident = pte_identifier(path)
    if ident not in PTE_IDENTIFIERS:
        reads = ", ".join(i.decode("ascii") for i in PTE_IDENTIFIERS)
        raise UnreadableModelError(
            f"{Path(path).name} is an ExecuTorch program with identifier {ident!r}, but the pinned "
            f"{EXECUTORCH_ANDROID}:{EXECUTORCH_ANDROID_VERSION} reads only {reads}: export with the "
            f"matching executorch release, or change the pin in mobile_app/android_versions.py and buildozer.spec")
    return ident


# ----------------------------------------------------------------------------- ONNX

def onnx_versions(path: Path | str) -> tuple[int, int]:
    """(IR version, ai.onnx opset) of an .onnx file: the onnx package where installed, else a minimal reader."""
    try:
        import onnx
        from google.protobuf.message import DecodeError  # onnx depends on protobuf
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (OSError, DecodeError) as exc:
            raise ModelError(f"cannot read {Path(path).name} as ONNX: {exc}") from exc
        opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        return int(model.ir_version), max(opsets, default=0)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {Path(path).name}: {exc}") from exc
    return parse_onnx_versions(data, Path(path).name)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """Top-level protobuf fields as (number, wire type, value); length-delimited values as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, wire, value))
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            out.append((number, wire, data[pos:pos + size]))
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
    return out


def parse_onnx_versions(data: bytes, name: str = "model") -> tuple[int, int]:
    """ModelProto field 1 = ir_version, field 8 = opset_import (OperatorSetIdProto: 1 domain, 2 version)."""
    try:
        ir_version, opset = 0, 0
        for number, wire, value in _fields(data):
            if number == 1 and wire == 0:
                ir_version = int(value)  # type: ignore[arg-type]
            elif number == 8 and wire == 2:
                domain, version = b"", 0
                for n, w, v in _fields(value):  # type: ignore[arg-type]
                    if n == 1 and w == 2:
                        domain = v  # type: ignore[assignment]
                    elif n == 2 and w == 0:
                        version = int(v)  # type: ignore[arg-type]
                if domain in (b"", b"ai.onnx"):
                    opset = max(opset, version)
    except ValueError as exc:
        raise ModelError(f"{name} is not a readable ONNX model: {exc}") from exc
    if ir_version == 0:
        raise ModelError(f"{name} is not a readable ONNX model: no IR version")
    return ir_version, opset


def check_onnx(path: Path | str) -> tuple[int, int]:
    """Refuse an .onnx of a newer IR version or opset than the pinned onnxruntime-android reads."""
    ir_version, opset = onnx_versions(path)
    if ir_version > ORT_MAX_IR_VERSION or opset > ORT_MAX_OPSET:
        raise UnreadableModelError(
            f"{Path(path).name} has ONNX IR version {ir_version} and opset {opset}, but the pinned "
            f"{ONNXRUNTIME_ANDROID}:{ONNXRUNTIME_ANDROID_VERSION} reads IR version <= {ORT_MAX_IR_VERSION} and "
            f"opset <= {ORT_MAX_OPSET}: export with a lower opset, or raise the pin in "
            f"mobile_app/android_versions.py and buildozer.spec")
    return ir_version, opset


def check_for_android(path: Path | str, fmt: str) -> str:
    """Check a model file against the pinned Android runtime of its format; a one-line summary of what it has."""
    if fmt == "executorch":
        return f"ExecuTorch identifier {check_pte(path).decode('ascii', 'replace')}"
    if fmt == "onnx":
        ir_version, opset = check_onnx(path)
        return f"ONNX IR version {ir_version}, opset {opset}"
    return ""
