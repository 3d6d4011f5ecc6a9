"""benchmarks.latency --quick on the real tiny export of conftest's `smoke_export` (manifest + onnx + pte, best.pt)."""
from __future__ import annotations

import json
from pathlib import Path


def test_latency_quick(smoke_export: Path, tmp_path: Path):
    from benchmarks.latency import main
    from cellcore.manifest import read_manifest

    manifest = read_manifest(smoke_export)
    out = tmp_path / "bench"
    rc = main(["--export-dir", str(smoke_export), "--quick", "--out", str(out), "--select", "fp32",
               "--runtimes", "onnxruntime,executorch,eager", "--time-box", "0.1", "--max-runs", "5"])
    assert rc == 0
    doc = json.loads((out / "latency.json").read_text())
    md = (out / "latency.md").read_text()
    assert (out / "latency.png").stat().st_size > 1000
    rows = doc["rows"]
    by = {(r["runtime"], r.get("artifact"), r.get("batch")): r for r in rows}
    onnx = next(a["file"] for a in manifest["artifacts"] if a["file"].endswith("fp32.onnx"))
    pte = next(a["file"] for a in manifest["artifacts"] if a["file"].endswith("fp32.pte"))
    assert not any("int8" in (r.get("artifact") or "") for r in rows)  # --select fp32
    for key in (("onnxruntime", onnx, 1), ("onnxruntime", onnx, 2), ("executorch", pte, 1),
                ("eager", "best.pt", 1), ("eager", "best.pt", 2)):
        r = by[key]
        assert r["status"] == "ok", r
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] > 0 and r["peak_rss_mb"] > 10 and r["load_s"] >= 0
        assert r["floor_ms"] > 0 and r["x_floor"] > 0 and r["threads"] == 1
    assert by[("executorch", pte, 2)]["status"].startswith("n/a")  # a .pte is static batch 1
    # memory is per runtime: the ONNX Runtime worker never imports torch
    assert by[("onnxruntime", onnx, 1)]["peak_rss_mb"] < by[("eager", "best.pt", 1)]["peak_rss_mb"]
    assert doc["machine"]["cpu"] and doc["machine"]["versions"]["onnxruntime"]
    assert doc["matmul"]["1"]["flops_per_s"] > 1e8 and doc["flops_per_image"] > 1e6
    assert any(r["runtime"] == "coreml" and "needs macOS" in r["status"] for r in rows)  # the coreml_fp16 artifact
    assert "needs macOS" in md and "p50 ms" in md and "GFLOP/s" in md


def test_latency_missing_manifest(tmp_path: Path):
    from benchmarks.latency import main

    assert main(["--export-dir", str(tmp_path / "nope")]) == 2


def test_compile_failure_is_a_row_not_a_crash(smoke_export: Path, monkeypatch):
    """torch.compile that raises is recorded as 'failed: reason' (here forced, to stay fast)."""
    import torch

    from benchmarks import latency

    def boom(*a, **k):
        raise RuntimeError("inductor unavailable")

    monkeypatch.setattr(torch, "compile", boom)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # in-process: leave this process's threads alone
    size = json.loads((smoke_export / "manifest.json").read_text())["input"]["shape"][-1]
    rows = latency.run_worker({"runtime": "compile", "path": str(smoke_export.parent / "best.pt"), "input_size": size,
                               "configs": [{"batch": 1, "threads": 1}], "warmup": 1, "time_box": 0.05,
                               "max_runs": 2, "min_runs": 1})
    assert rows[0]["status"] == "failed: RuntimeError: inductor unavailable"
