"""Latency of a run's .pte and .onnx on an Android phone over adb, with the runtimes' own benchmark binaries."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_AND_USAGE = """\
ExecuTorch: `executor_runner` cross-compiled with XNNPACK (ExecuTorch docs, "Cross-compiling for Android"):

    cmake -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake -DANDROID_ABI=arm64-v8a \\
          -DANDROID_PLATFORM=android-26 -DCMAKE_BUILD_TYPE=Release -DEXECUTORCH_BUILD_XNNPACK=ON \\
          -DEXECUTORCH_ENABLE_LOGGING=ON -Bcmake-android-out .
    cmake --build cmake-android-out -j9 --target executor_runner      # -> cmake-android-out/executor_runner

ONNX Runtime: `onnxruntime_perf_test`, built with the tests (no --skip_tests) by onnxruntime's build script
(onnxruntime docs, "Build for Android"):

    ./build.sh --config Release --android --android_sdk_path $ANDROID_HOME --android_ndk_path $ANDROID_NDK \\
               --android_abi arm64-v8a --android_api 26 --parallel      # -> build/Android/Release/onnxruntime_perf_test

python -m benchmarks.device.android_bench --run cpu --executor-runner PATH --perf-test PATH [--dry-run]

Without adb, or with no device in `adb devices`, it says so and exits 3; --dry-run prints the exact
commands instead and needs neither. Results: runs/<name>/bench/android_latency.{json,md} in the table
format of latency.md.
"""

EXIT_NO_DEVICE = 3
REMOTE_DIR = "/data/local/tmp/cellvit_bench"
DEFAULT_RUNNER = os.environ.get("EXECUTOR_RUNNER", "executorch/cmake-android-out/executor_runner")
DEFAULT_PERF_TEST = os.environ.get("ORT_PERF_TEST", "onnxruntime/build/Android/Release/onnxruntime_perf_test")


@dataclass
class Measurement:
    """One on-device benchmark: the shell command line run on the phone and what it measures."""

    runtime: str           # executorch | onnxruntime
    artifact: str
    precision: str
    batch: int
    threads: int
    remote_cmd: str
    meta: dict = field(default_factory=dict)


@dataclass
class Plan:
    setup: list[list[str]]            # host commands (adb push, chmod, mkdir)
    measurements: list[Measurement]
    adb: list[str]                    # adb [-s serial]

    def shell(self, remote_cmd: str) -> list[str]:
        return [*self.adb, "shell", remote_cmd]

    def lines(self) -> list[str]:
        return [shlex.join(c) for c in self.setup] + [shlex.join(self.shell(m.remote_cmd)) for m in self.measurements]


def build_plan(manifest: dict, export_dir: Path, adb: str, serial: str | None, runner: str, perf_test: str,
               perf_test_lib: str | None, runs: int, threads: list[int], batches: list[int], remote: str,
               batch_dim: str = "batch", select: str | None = None) -> Plan:
    """Every command, in order: mkdir, push binaries and models, chmod, then one shell command per measurement."""
    base = [adb] + (["-s", serial] if serial else [])
    setup = [[*base, "shell", f"mkdir -p {remote}"]]
    ptes = [a for a in manifest["artifacts"] if a["file"].endswith(".pte") and (not select or select in a["file"])]
    onnxs = [a for a in manifest["artifacts"] if a["file"].endswith(".onnx") and (not select or select in a["file"])]
    r_runner, r_perf = f"{remote}/executor_runner", f"{remote}/onnxruntime_perf_test"
    if ptes:
        setup.append([*base, "push", runner, r_runner])
    if onnxs:
        setup.append([*base, "push", perf_test, r_perf])
        if perf_test_lib:
            setup.append([*base, "push", perf_test_lib, f"{remote}/{Path(perf_test_lib).name}"])
    for a in ptes + onnxs:
        setup.append([*base, "push", str(export_dir / a["file"]), f"{remote}/{a['file']}"])
        if (export_dir / f"{a['file']}.data").exists():  # ONNX external weights travel next to the graph
            setup.append([*base, "push", str(export_dir / f"{a['file']}.data"), f"{remote}/{a['file']}.data"])
    chmod = " ".join(p for p, has in ((r_runner, ptes), (r_perf, onnxs)) if has)
    if chmod:
        setup.append([*base, "shell", f"chmod 755 {chmod}"])
    ms = []
    for a in ptes:
        for t in threads:
            # .pte: static [1, 3, S, S]; executor_runner feeds ones and times each execution.
            cmd = f"{r_runner} --model_path {remote}/{a['file']} --num_executions {runs} --cpu_threads {t}"
            ms.append(Measurement("executorch", a["file"], a.get("precision", "?"), 1, t, cmd))
    env = f"LD_LIBRARY_PATH={remote} " if perf_test_lib else ""
    for a in onnxs:
        for b in batches:
            for t in threads:
                # -I: generated random inputs (free dims = 1, -f overrides the batch); -s: P50/P90/P99.
                fdim = f" -f {batch_dim}:{b}" if b != 1 else ""
                cmd = (f"{env}{r_perf} -e cpu -m times -r {runs} -x {t} -y 1 -I -s{fdim} "
                       f"{remote}/{a['file']}")
                ms.append(Measurement("onnxruntime", a["file"], a.get("precision", "?"), b, t, cmd))
    return Plan(setup, ms, base)


# ----------------------------------------------------------------------------- output parsing

def parse_executor_runner(text: str, batch: int = 1) -> dict:
    """executor_runner log -> latency stats. Per-iteration lines when the runner prints them, else the mean."""
    it = [float(x) for x in re.findall(r"Iteration \d+ of \d+: ([0-9.]+) ms", text)]
    load = re.search(r"Model loaded in ([0-9.]+) ms", text)
    total = re.search(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms", text)
    out: dict = {"load_s": float(load.group(1)) / 1000 if load else None}
    if len(it) >= 2:
        timed = it[1:]  # the first execution is the warm-up (XNNPACK packs weights, caches fill)
        q = statistics.quantiles(timed, n=100, method="inclusive") if len(timed) > 1 else timed * 99
        out.update(runs=len(timed), p50_ms=statistics.median(timed), p90_ms=q[89], p99_ms=q[98],
                   mean_ms=statistics.fmean(timed), status="ok")
    elif total:
        n, ms = int(total.group(1)), float(total.group(2))
        mean = ms / max(n, 1)
        out.update(runs=n, mean_ms=mean, p50_ms=mean, p90_ms=mean, p99_ms=mean, status="ok",
                   note="this executor_runner prints only the total: p50/p90/p99 are the mean (warm-up included)")
    else:
        tail = " | ".join(ln for ln in text.strip().splitlines()[-2:])
        return {"status": f"failed: no timing in executor_runner output ({tail[-200:]})"}
    out["images_per_s"] = batch / (out["mean_ms"] / 1000)
    return out


def parse_perf_test(text: str, batch: int = 1) -> dict:
    """onnxruntime_perf_test stdout -> latency stats (P50/P90/P99 'Latency: X s' or older 'Latency is Xsec')."""
    def pct(name: str) -> float | None:
        m = re.search(rf"{name} Latency(?::| is)\s*([0-9.eE+-]+)\s*s", text)
        return float(m.group(1)) * 1000 if m else None

    avg = re.search(r"Average inference time cost:\s*([0-9.eE+-]+)\s*ms", text) or \
        re.search(r"Average time cost:\s*([0-9.eE+-]+)\s*ms", text)
    if not avg:
        tail = " | ".join(text.strip().splitlines()[-2:])
        return {"status": f"failed: no timing in onnxruntime_perf_test output ({tail[-200:]})"}
    mean = float(avg.group(1))
    runs = re.search(r"Total inference requests:\s*(\d+)", text) or re.search(r"Total iterations:\s*(\d+)", text)
    sess = re.search(r"Session creation time cost:\s*([0-9.eE+-]+)\s*s", text)
    peak = re.search(r"Peak working set size:\s*(\d+)", text)
    return {"status": "ok", "mean_ms": mean, "p50_ms": pct("P50") or mean, "p90_ms": pct("P90") or mean,
            "p99_ms": pct("P99") or mean, "runs": int(runs.group(1)) if runs else None,
            "load_s": float(sess.group(1)) if sess else None,
            "peak_rss_mb": int(peak.group(1)) / 2 ** 20 if peak else None, "images_per_s": batch / (mean / 1000)}


# ----------------------------------------------------------------------------- adb

def attached_devices(adb: str) -> list[str]:
    """Serials `adb devices` lists in state 'device' (unauthorized/offline ones are not usable)."""
    out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=30).stdout
    serials = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "device":
            serials.append(parts[0])
        elif len(parts) >= 2:
            log.warning("adb lists %s as '%s' (not usable: unlock/authorize the phone)", parts[0], parts[1])
    return serials


def device_info(adb: list[str]) -> dict:
    def prop(name: str) -> str:
        r = subprocess.run([*adb, "shell", "getprop", name], capture_output=True, text=True, timeout=30)
        return r.stdout.strip()

    return {"model": prop("ro.product.model"), "manufacturer": prop("ro.product.manufacturer"),
            "soc": prop("ro.soc.model") or prop("ro.board.platform"), "android": prop("ro.build.version.release"),
            "abi": prop("ro.product.cpu.abi")}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device.android_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BUILD_AND_USAGE)
    p.add_argument("--run", help="run name: runs/<name>/export/manifest.json")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--export-dir", help="export folder (default runs/<run>/export)")
    p.add_argument("--out", help="output folder (default <run>/bench)")
    p.add_argument("--adb", default="adb", help="adb executable")
    p.add_argument("--serial", help="device serial (needed when several are attached)")
    p.add_argument("--executor-runner", default=DEFAULT_RUNNER, help="host path of the Android executor_runner "
                   "(env EXECUTOR_RUNNER)")
    p.add_argument("--perf-test", default=DEFAULT_PERF_TEST, help="host path of the Android onnxruntime_perf_test "
                   "(env ORT_PERF_TEST)")
    p.add_argument("--perf-test-lib", help="libonnxruntime.so to push when perf_test was linked against it")
    p.add_argument("--runtimes", default="executorch,onnxruntime", help="comma list: executorch,onnxruntime")
    p.add_argument("--select", help="only artifacts whose file name contains this, e.g. int8")
    p.add_argument("--num-runs", type=int, default=100, help="timed executions per measurement")
    p.add_argument("--threads", default="1,4", help="comma list of CPU thread counts (default 1,4)")
    p.add_argument("--batch", type=int, default=None, help="also an ONNX batch of this size (.pte: batch 1 only)")
    p.add_argument("--batch-dim", default="batch", help="name of the ONNX free batch dimension (for -f)")
    p.add_argument("--remote-dir", default=REMOTE_DIR)
    p.add_argument("--timeout", type=float, default=900, help="seconds per on-device command")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands; needs no adb and no phone")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    from cellcore.manifest import ManifestError, read_manifest

    if not (args.export_dir or args.run):
        log.error("pass --run <name> (or --export-dir)")
        return 2
    export_dir = Path(args.export_dir) if args.export_dir else Path(args.runs_root) / args.run / "export"
    try:
        manifest = read_manifest(export_dir)
    except ManifestError as exc:
        log.error("%s", exc)
        return 2
    runtimes = {r.strip() for r in args.runtimes.split(",")}
    if not runtimes <= {"executorch", "onnxruntime"}:
        log.error("--runtimes: valid are executorch, onnxruntime")
        return 2
    manifest = dict(manifest, artifacts=[a for a in manifest["artifacts"] if
                                         (a["file"].endswith(".pte") and "executorch" in runtimes) or
                                         (a["file"].endswith(".onnx") and "onnxruntime" in runtimes)])
    if not manifest["artifacts"]:
        log.error("%s: no .pte or .onnx artifacts to benchmark", export_dir)
        return 2
    threads = [int(t) for t in args.threads.split(",")]
    batches = [1] + ([args.batch] if args.batch and args.batch != 1 else [])
    serial = args.serial
    if args.dry_run:
        plan = build_plan(manifest, export_dir, args.adb, serial, args.executor_runner, args.perf_test,
                          args.perf_test_lib, args.num_runs, threads, batches, args.remote_dir, args.batch_dim,
                          args.select)
        print("\n".join(plan.lines()))
        return 0

    if shutil.which(args.adb) is None:
        log.error("NO ANDROID DEVICE: adb (%s) is not installed or not on PATH, so no phone can be reached. "
                  "Install Android platform-tools, plug in a phone with USB debugging on, or use --dry-run.", args.adb)
        return EXIT_NO_DEVICE
    try:
        serials = attached_devices(args.adb)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("NO ANDROID DEVICE: `%s devices` failed (%s)", args.adb, exc)
        return EXIT_NO_DEVICE
    if not serials:
        log.error("NO ANDROID DEVICE: `%s devices` lists none. Connect a phone with USB debugging enabled and "
                  "accept the authorization prompt, then re-run (or use --dry-run to see the commands).", args.adb)
        return EXIT_NO_DEVICE
    if serial and serial not in serials:
        log.error("device %s is not attached; attached: %s", serial, ", ".join(serials))
        return EXIT_NO_DEVICE
    if not serial:
        if len(serials) > 1:
            log.error("several devices attached (%s): pick one with --serial", ", ".join(serials))
            return 2
        serial = serials[0]
    files = [a["file"] for a in manifest["artifacts"]]
    missing = [p for p, needed in ((args.executor_runner, any(f.endswith(".pte") for f in files)),
                                   (args.perf_test, any(f.endswith(".onnx") for f in files)))
               if needed and not Path(p).is_file()]
    if missing:
        log.error("benchmark binary not found: %s (build it for Android as "
                  "`python -m benchmarks.device.android_bench --help` says)", ", ".join(missing))
        return 2
    plan = build_plan(manifest, export_dir, args.adb, serial, args.executor_runner, args.perf_test, args.perf_test_lib,
                      args.num_runs, threads, batches, args.remote_dir, args.batch_dim, args.select)
    for cmd in plan.setup:
        log.info("%s", shlex.join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if r.returncode != 0:
            log.error("failed (exit %d): %s", r.returncode, (r.stderr or r.stdout).strip()[-500:])
            return 1
    info = {"serial": serial, **device_info(plan.adb)}
    log.info("device: %s", info)
    rows = []
    for m in plan.measurements:
        log.info("%s", shlex.join(plan.shell(m.remote_cmd)))
        try:
            r = subprocess.run(plan.shell(m.remote_cmd), capture_output=True, text=True, timeout=args.timeout)
            text = r.stdout + "\n" + r.stderr
            res = (parse_executor_runner if m.runtime == "executorch" else parse_perf_test)(text, m.batch)
            if r.returncode != 0 and res.get("status") == "ok":
                res["status"] = f"failed: exit {r.returncode}"
        except subprocess.TimeoutExpired:
            res = {"status": f"failed: timed out after {args.timeout:.0f} s"}
        rows.append({"runtime": m.runtime, "artifact": m.artifact, "precision": m.precision, "batch": m.batch,
                     "threads": m.threads, "command": m.remote_cmd, **res})
    from benchmarks.latency import format_table

    out = Path(args.out) if args.out else export_dir.parent / "bench"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": info, "export_dir": str(export_dir), "num_runs": args.num_runs, "rows": rows,
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = format_table(rows)
    (out / "android_latency.json").write_text(json.dumps(doc, indent=1))
    (out / "android_latency.md").write_text(
        f"# On-device latency: {info.get('manufacturer', '')} {info.get('model', '')} "
        f"({info.get('soc', '')}, Android {info.get('android', '')}, {info.get('abi', '')})\n\n"
        f"executor_runner (ExecuTorch, all-ones input, first execution dropped as warm-up) and "
        f"onnxruntime_perf_test (-I random input), {args.num_runs} runs each. Peak RSS: ONNX Runtime's "
        f"'Peak working set size'; executor_runner does not report memory.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
