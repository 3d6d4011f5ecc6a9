"""benchmarks.device.android_bench: exact --dry-run commands, a clear non-zero exit without a phone, output parsing."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

REMOTE = "/data/local/tmp/cellvit_bench"


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A manifest with the six artifacts export writes (dummy bytes: nothing is run)."""
    from cellcore.manifest import SCHEMA_VERSION, sha256_of, write_manifest

    d = tmp_path / "runs" / "r1" / "export"
    d.mkdir(parents=True)
    arts = []
    for fname, fmt, prec in (("mobilevit_xxs_onnx_fp32.onnx", "onnx", "fp32"),
                             ("mobilevit_xxs_onnx_int8.onnx", "onnx", "int8"),
                             ("mobilevit_xxs_xnnpack_fp32.pte", "executorch", "fp32"),
                             ("mobilevit_xxs_xnnpack_int8.pte", "executorch", "int8"),
                             ("mobilevit_xxs_coreml_fp16.mlpackage", "coreml", "fp16")):
        p = d / fname
        if fname.endswith(".mlpackage"):
            p.mkdir()
            (p / "Manifest.json").write_text("{}")
        else:
            p.write_bytes(fname.encode())
        arts.append({"file": fname, "format": fmt, "precision": prec, "sha256": sha256_of(p)})
    write_manifest({"schema_version": SCHEMA_VERSION, "model": {"arch": "mobilevit_xxs"}, "classes": ["a", "b"],
                    "input": {"shape": [1, 3, 128, 128]}, "preprocessing": {"input_size": 128}, "output": {},
                    "uncertainty": {"threshold": None}, "artifacts": arts}, d)
    return d


def test_dry_run_prints_exact_commands(export_dir: Path, capsys):
    from benchmarks.device.android_bench import main

    rc = main(["--export-dir", str(export_dir), "--dry-run", "--serial", "R5CT", "--executor-runner",
               "/b/executor_runner", "--perf-test", "/b/onnxruntime_perf_test", "--threads", "1,4", "--batch", "8",
               "--num-runs", "50"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"adb -s R5CT shell 'mkdir -p {REMOTE}'"
    assert f"adb -s R5CT push /b/executor_runner {REMOTE}/executor_runner" in lines
    assert f"adb -s R5CT push /b/onnxruntime_perf_test {REMOTE}/onnxruntime_perf_test" in lines
    pte = "mobilevit_xxs_xnnpack_int8.pte"
    assert f"adb -s R5CT push {export_dir}/{pte} {REMOTE}/{pte}" in lines
    assert not any("mlpackage" in ln for ln in lines)  # Core ML is iOS-only (IOS.md)
    assert (f"adb -s R5CT shell '{REMOTE}/executor_runner --model_path {REMOTE}/mobilevit_xxs_xnnpack_fp32.pte "
            f"--num_executions 50 --cpu_threads 4'") in lines
    assert (f"adb -s R5CT shell '{REMOTE}/onnxruntime_perf_test -e cpu -m times -r 50 -x 1 -y 1 -I -s "
            f"{REMOTE}/mobilevit_xxs_onnx_int8.onnx'") in lines
    assert (f"adb -s R5CT shell '{REMOTE}/onnxruntime_perf_test -e cpu -m times -r 50 -x 4 -y 1 -I -s -f batch:8 "
            f"{REMOTE}/mobilevit_xxs_onnx_fp32.onnx'") in lines
    # .pte: batch 1 only (static shape) -> 2 pte x 2 threads; onnx: 2 x 2 threads x 2 batches
    assert sum("executor_runner --model_path" in ln for ln in lines) == 4
    assert sum("onnxruntime_perf_test -e cpu" in ln for ln in lines) == 8


def test_no_adb_exits_nonzero_with_a_clear_message(export_dir: Path, caplog):
    from benchmarks.device.android_bench import EXIT_NO_DEVICE, main

    assert main(["--export-dir", str(export_dir), "--adb", "/nonexistent/adb"]) == EXIT_NO_DEVICE != 0
    assert "NO ANDROID DEVICE" in caplog.text and "not installed" in caplog.text


def test_no_device_listed_exits_nonzero(export_dir: Path, tmp_path: Path, caplog):
    from benchmarks.device.android_bench import EXIT_NO_DEVICE, main

    fake = tmp_path / "adb"
    fake.write_text("#!/bin/sh\nprintf 'List of devices attached\\nemulator-5554\\toffline\\n\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert main(["--export-dir", str(export_dir), "--adb", str(fake)]) == EXIT_NO_DEVICE
    assert "lists none" in caplog.text and "offline" in caplog.text


def test_parse_executor_runner():
    from benchmarks.device.android_bench import parse_executor_runner

    log = "I 00:00:00.1 executor_runner.cpp:200] Model loaded in 12.5 ms.\n" + "".join(
        f"I 00:00:01 executor_runner.cpp:300] Iteration {i + 1} of 11: {v} ms\n"
        for i, v in enumerate([50.0] + [10.0 + j for j in range(10)])) + \
        "I 00:00:02 executor_runner.cpp:310] Model executed successfully 11 time(s) in 205.0 ms.\n"
    r = parse_executor_runner(log)
    assert r["status"] == "ok" and r["runs"] == 10  # the 50 ms warm-up is dropped
    assert r["p50_ms"] == pytest.approx(14.5) and r["p99_ms"] <= 19.0 and r["load_s"] == pytest.approx(0.0125)
    old = "Model executed successfully 100 time(s) in 1500.0 ms."
    assert parse_executor_runner(old)["mean_ms"] == pytest.approx(15.0)
    assert parse_executor_runner("Segmentation fault")["status"].startswith("failed")


def test_parse_perf_test():
    from benchmarks.device.android_bench import parse_perf_test

    out = ("Session creation time cost: 0.0812 s\nFirst inference time cost: 30 ms\nTotal inference time cost: 1.2 s\n"
           "Total inference requests: 100\nAverage inference time cost: 12 ms\nTotal inference run time: 1.21 s\n"
           "Number of inferences per second: 82.6\nAvg CPU usage: 98 %\nPeak working set size: 73400320 bytes\n"
           "Min Latency: 0.0101 s\nMax Latency: 0.02 s\nP50 Latency: 0.0115 s\nP90 Latency: 0.0131 s\n"
           "P95 Latency: 0.014 s\nP99 Latency: 0.0172 s\nP999 Latency: 0.02 s\n")
    r = parse_perf_test(out, batch=4)
    assert r["status"] == "ok" and r["runs"] == 100
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == pytest.approx((11.5, 13.1, 17.2))
    assert r["peak_rss_mb"] == pytest.approx(70.0) and r["load_s"] == pytest.approx(0.0812)
    assert r["images_per_s"] == pytest.approx(4 / 0.012)
    assert parse_perf_test("failed to initialize.")["status"].startswith("failed")
