"""A hand-built export folder (manifest + tiny ONNX model, optional fake .pte) for tests that must not train.

The ONNX model is real (GlobalAveragePool -> Flatten -> Gemm, any IR version / opset asked for), so the
runtimes compute real numbers from it; the .pte is only a header with a chosen file identifier, enough
for the version checks that read nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cellcore.files import sha256_of

CLASSES = ["blast", "lymphocyte", "neutrophil"]
SIZE = 32


def tiny_onnx(path: Path, ir_version: int = 8, opset: int = 17) -> Path:
    """[1, 3, 32, 32] 'image' -> [1, 3] 'logits': the mean colour through a fixed linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[4.0, -2.0, 0.5], [-1.0, 3.0, 0.0], [0.5, -1.0, 2.5]], dtype=np.float32)  # [3 colours, C]
    b = np.array([0.1, -0.2, 0.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, len(CLASSES)])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


def fake_pte(path: Path, identifier: bytes = b"ET12") -> Path:
    """Bytes 0..4 root offset, 4..8 the flatbuffer file identifier, 8..16 ExecuTorch's extended header magic."""
    path.write_bytes(b"\x18\x00\x00\x00" + identifier + b"eh00" + b"\x00" * 56)
    return path


def write_export(folder: Path, files: list[tuple[Path, str]]) -> Path:
    """manifest.json (schema 1) listing `files` as (path inside folder, format)."""
    artifacts = [{"file": p.name, "format": fmt, "precision": "fp32", "runtime": fmt, "batch": 1,
                  "input": "image", "output": "logits", "output_kind": "logits", "sha256": sha256_of(p),
                  "size_bytes": p.stat().st_size} for p, fmt in files]
    manifest = {"schema_version": 1, "classes": CLASSES, "input": {"name": "image"},
                "preprocessing": {"input_size": SIZE}, "output": {"name": "logits"},
                "uncertainty": {"threshold": 0.5}, "artifacts": artifacts}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def tiny_export(folder: Path, ir_version: int = 8, opset: int = 17, pte_identifier: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = [(tiny_onnx(folder / "tiny.onnx", ir_version, opset), "onnx")]
    if pte_identifier is not None:
        files.append((fake_pte(folder / "tiny_xnnpack_fp32.pte", pte_identifier), "executorch"))
    return write_export(folder, files)


def photo(path: Path, seed: int = 0) -> Path:
    """A small real JPEG with random colours."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path, quality=95)
    return path
