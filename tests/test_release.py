"""make release-model's choices: which file ships, and how a rebuilt bundle is compared with the committed one."""
from __future__ import annotations

import copy

import pytest

from export.release import compare, pick_artifact


def _manifest() -> dict:
    arts = [("m_onnx_fp32.onnx", "onnx", "fp32", 3_900_000, "PASS"),
            ("m_onnx_int8.onnx", "onnx", "int8", 1_300_000, "PASS"),
            ("m_xnnpack_int8.pte", "executorch", "int8", 1_100_000, "PASS"),
            ("m_onnx_fp16.onnx", "onnx", "fp16", 900_000, "FAILED")]
    return {"artifacts": [{"file": f, "format": fmt, "precision": p, "size_bytes": n, "sha256": f * 2}
                          for f, fmt, p, n, _ in arts],
            "metrics": {"verify": {f: {"status": st, "accuracy": 0.97} for f, _, _, _, st in arts},
                        "verify_source": {"source": "runs/release/split.json test split"}},
            "source": {"git_commit": "abc"}}


def test_the_smallest_file_that_passed_ships() -> None:
    m = _manifest()
    assert pick_artifact(m)["file"] == "m_xnnpack_int8.pte"  # the smallest that passed; never the failed fp16
    m["metrics"]["verify"]["m_xnnpack_int8.pte"]["status"] = "FAILED"  # e.g. a rare class's recall collapsed
    assert pick_artifact(m)["file"] == "m_onnx_int8.onnx"
    for e in m["metrics"]["verify"].values():
        e["status"] = "FAILED"
    with pytest.raises(RuntimeError, match="no onnx or executorch file passed verification"):
        pick_artifact(m)


def test_comparison_says_identical_or_shows_both_numbers() -> None:
    old, new = _manifest(), _manifest()
    assert compare(old, new, "m_onnx_int8.onnx").startswith("identical")
    new = copy.deepcopy(new)
    new["artifacts"][1]["sha256"] = "other"
    new["metrics"]["verify"]["m_onnx_int8.onnx"]["accuracy"] = 0.95
    text = compare(old, new, "m_onnx_int8.onnx")
    assert "| m_onnx_int8.onnx | 97.00% (PASS) | 95.00% (PASS) |" in text and "test split" in text
    assert compare(None, new, "m_onnx_int8.onnx") == "no earlier bundle to compare with"
