"""Inference latency, throughput and memory of every exported artifact of a run, next to the machine's FLOP/s floor."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

NOTES = """\
python -m benchmarks.latency --run cpu            # runs/cpu/export/manifest.json + runs/cpu/best.pt
python -m benchmarks.latency --run cpu --quick    # seconds: batch 1 and 2, 1 thread, short time box

Every measured configuration runs in its own subprocess (``--quick``: one per runtime), so the peak
resident memory (VmHWM; getrusage off Linux) belongs to that runtime alone: the ONNX Runtime worker never
imports torch. Results: runs/<name>/bench/latency.{json,md,png}.
"""

RESULT_TAG = "LATENCY_RESULT "
RUNTIME_LABELS = {
    "onnxruntime": "ONNX Runtime (CPU EP)",
    "executorch": "ExecuTorch (XNNPACK)",
    "eager": "PyTorch eager",
    "compile": "torch.compile (inductor)",
    "coreml": "Core ML",
}
DEFAULT_RUNTIMES = ("onnxruntime", "executorch", "eager", "compile")
QUICK_RUNTIMES = ("onnxruntime", "executorch", "eager")


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                name = line.split(":", 1)[1].strip()
                if name and not name.isdigit():
                    return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide fp32/int8 kernel speed (x86: avx2/avx512/vnni; Arm: asimd/dotprod/i8mm)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime", "executorch", "numpy", "coremltools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "usable_cores": usable_cores(), "platform": platform.platform(), "machine": platform.machine(),
            "versions": versions()}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image, MB.

    Linux: VmHWM from /proc/self/status. getrusage's ru_maxrss is not usable in a worker there: Linux
    carries it across fork+execve, so every worker would report the (torch-loaded) parent's peak.
    Elsewhere getrusage (bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ----------------------------------------------------------------------------- worker side (in a subprocess)

def _time_calls(fn, warmup: int, time_box: float, max_runs: int, min_runs: int) -> dict:
    """Warm up, then call fn until time_box seconds (at least min_runs, at most max_runs); latency stats in ms."""
    import numpy as np

    t_warm = time.perf_counter()
    for i in range(max(1, warmup)):
        fn()
        if i >= 1 and time.perf_counter() - t_warm > 2 * time_box:
            break
    times = []
    t0 = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - t0 < time_box):
        s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - s) * 1000.0)
    ms = np.asarray(times)
    return {"runs": len(times), "measured_s": round(time.perf_counter() - t0, 3),
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "std_ms": float(ms.std())}


def _load_onnx(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rss_lib = _peak_rss_mb()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    inp = sess.get_inputs()[0]

    def make(batch: int, size: int):
        import numpy as np

        if isinstance(inp.shape[0], int) and inp.shape[0] != batch:
            return None
        x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        feed = {inp.name: x}
        return lambda: sess.run(None, feed)

    return make, load_s, {"providers": sess.get_providers(), "rss_after_import_mb": round(rss_lib, 1)}


def _load_pte(path: str, threads: int):
    import torch
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
    from executorch.runtime import Runtime

    rss_lib = _peak_rss_mb()
    t0 = time.perf_counter()
    program = Runtime.get().load_program(path)
    method = program.load_method("forward")
    load_s = time.perf_counter() - t0
    meta = method.metadata.input_tensor_meta(0).sizes() if hasattr(method, "metadata") else None

    def make(batch: int, size: int):
        if meta is not None and tuple(meta)[0] != batch:
            return None  # static shape: the exported .pte only takes its export batch (1)
        x = torch.rand(batch, 3, size, size)
        return lambda: method.execute([x])

    return make, load_s, {"threadpool_threads": portable_lib._threadpool_get_thread_count(),
                          "rss_after_import_mb": round(rss_lib, 1),
                          "static_input_shape": list(meta) if meta is not None else None}


def _load_torch(path: str, threads: int, compiled: bool, tta: str = "none"):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    import timm  # noqa: F401 - imported before the clock starts: load time is the model's, not the libraries'
    import torchvision  # noqa: F401

    from train.checkpoint import load_checkpoint, model_from_checkpoint

    rss_lib = _peak_rss_mb()
    t0 = time.perf_counter()
    model, _, _ = model_from_checkpoint(load_checkpoint(path), path, tta=tta)
    load_s = time.perf_counter() - t0
    extra: dict = {"torch_threads": torch.get_num_threads(), "rss_after_import_mb": round(rss_lib, 1)}

    def make(batch: int, size: int):
        x = torch.rand(batch, 3, size, size)
        m = model
        if compiled:
            # dynamic=False: one graph per batch size, as a deployment would do; compile time is recorded.
            m = torch.compile(model, dynamic=False)
            t1 = time.perf_counter()
            with torch.inference_mode():
                m(x)
            extra["compile_s"] = round(time.perf_counter() - t1, 3)

        def run():
            with torch.inference_mode():
                m(x)
        return run

    return make, load_s, extra


def _matmul_flops(threads: int, n: int, time_box: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    stats = _time_calls(lambda: torch.matmul(a, b), warmup=2, time_box=time_box, max_runs=200, min_runs=3)
    # min over runs: the attainable rate (the floor is a lower bound on latency)
    return {"n": n, "threads": torch.get_num_threads(), "flops_per_s": 2 * n ** 3 / (stats["min_ms"] / 1000),
            "flops_per_s_median": 2 * n ** 3 / (stats["p50_ms"] / 1000)}


def run_worker(spec: dict) -> list[dict]:
    """One subprocess: load spec['runtime'] once per thread count and time each (batch, threads) of spec['configs']."""
    results = []
    rss0 = _peak_rss_mb()
    if spec["runtime"] == "matmul":
        for cfg in spec["configs"]:
            results.append({**cfg, "status": "ok", **_matmul_flops(cfg["threads"], spec["matmul_n"], spec["time_box"])})
        return results
    loaded: dict[int, tuple] = {}
    for cfg in spec["configs"]:
        threads, batch = cfg["threads"], cfg["batch"]
        row = {**cfg, "status": "ok"}
        try:
            if threads not in loaded:
                if spec["runtime"] == "onnxruntime":
                    loaded[threads] = _load_onnx(spec["path"], threads)
                elif spec["runtime"] == "executorch":
                    loaded[threads] = _load_pte(spec["path"], threads)
                else:
                    loaded[threads] = _load_torch(spec["path"], threads, spec["runtime"] == "compile",
                                                  spec.get("tta", "none"))
            make, load_s, extra = loaded[threads]
            fn = make(batch, spec["input_size"])
            if fn is None:
                row["status"] = "n/a: static batch 1"
            else:
                row.update(_time_calls(fn, spec["warmup"], spec["time_box"], spec["max_runs"], spec["min_runs"]))
                row["images_per_s"] = batch / (row["mean_ms"] / 1000)
            row.update(extra)
            # time to the first usable inference: session/program/model load (+ compilation for torch.compile)
            row["load_s"] = round(load_s + extra.get("compile_s", 0.0), 3)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this artifact is a result, not a crash
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            row["status"] = f"failed: {type(exc).__name__}: {first}"
            log.warning("%s %s batch %d threads %d: %s", spec["runtime"], spec.get("artifact"), batch, threads,
                        row["status"])
        row["rss_at_start_mb"] = round(rss0, 1)
        row["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        results.append(row)
    return results


# ----------------------------------------------------------------------------- parent side

def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def spawn(spec: dict, timeout: float) -> list[dict]:
    """Run one worker subprocess; a crash or timeout becomes a 'failed: ...' row per config, never an exception."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_repo_root()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.latency", "--worker", json.dumps(spec)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=_repo_root())
    except subprocess.TimeoutExpired:
        return [{**c, "status": f"failed: timed out after {timeout:.0f} s"} for c in spec["configs"]]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            rows = json.loads(line[len(RESULT_TAG):])
            log.info("%s %s: %d config(s) in %.1f s", spec["runtime"], spec.get("artifact", ""), len(rows),
                     time.time() - t0)
            return rows
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
    reason = " | ".join(tail)[-300:] or "no output"
    log.warning("%s worker exited %d: %s", spec["runtime"], proc.returncode, reason)
    return [{**c, "status": f"failed: exit {proc.returncode}: {reason}"} for c in spec["configs"]]


def plan_jobs(manifest: dict, export_dir: Path, checkpoint: Path, runtimes: tuple[str, ...], batches: list[int],
              threads: list[int], check_sha: bool, select: str | None = None) -> tuple[list[dict], list[dict]]:
    """(jobs to measure, rows that cannot run here). A job is one runtime + artifact with its configs."""
    from cellcore.manifest import ManifestError, artifact_path

    jobs, static_rows = [], []
    configs = [{"batch": b, "threads": t} for b in batches for t in threads]
    for entry in manifest["artifacts"]:
        fname = entry["file"]
        base = {"artifact": fname, "precision": entry.get("precision", "?"), "format": entry.get("format", "?")}
        suffix = Path(fname).suffix.lower()
        runtime = {".onnx": "onnxruntime", ".pte": "executorch", ".mlpackage": "coreml"}.get(suffix)
        if select and select not in fname and runtime != "coreml":  # Core ML rows cost nothing: always listed
            continue
        if runtime == "coreml":
            why = ("needs macOS (Core ML runs only on Apple platforms; see benchmarks/device/IOS.md)"
                   if sys.platform != "darwin" else "not measured here: use Xcode (benchmarks/device/IOS.md)")
            static_rows.append({**base, "runtime": "coreml", "batch": None, "threads": None, "status": why})
            continue
        if runtime is None or runtime not in runtimes:
            if runtime is None:
                static_rows.append({**base, "runtime": entry.get("runtime", "?"), "batch": None, "threads": None,
                                    "status": f"unsupported format {suffix}"})
            continue
        try:
            path = artifact_path(export_dir, entry, check=check_sha)
        except ManifestError as exc:
            static_rows.append({**base, "runtime": runtime, "batch": None, "threads": None, "status": f"failed: {exc}"})
            continue
        cfgs = [dict(c, **base, runtime=runtime) for c in configs]
        jobs.append({"runtime": runtime, "artifact": fname, "path": str(path.resolve()), "configs": cfgs})
    if not any(Path(e["file"]).suffix.lower() == ".mlpackage" for e in manifest["artifacts"]):
        static_rows.append({"artifact": "-", "precision": "-", "format": "coreml", "runtime": "coreml", "batch": None,
                            "threads": None, "status": "needs macOS (and no .mlpackage in this export)"})
    for rt in ("eager", "compile"):
        if rt not in runtimes:
            continue
        base = {"artifact": checkpoint.name, "precision": "fp32", "format": "pytorch", "runtime": rt}
        if not checkpoint.exists():
            static_rows.append({**base, "batch": None, "threads": None,
                                "status": f"failed: no checkpoint {checkpoint}"})
            continue
        jobs.append({"runtime": rt, "artifact": checkpoint.name, "path": str(checkpoint.resolve()),
                     "tta": (manifest.get("model") or {}).get("tta", "none"),  # time what the exported files compute
                     "configs": [dict(c, **base) for c in configs]})
    return jobs, static_rows


def add_floor(rows: list[dict], flops_per_image: int, matmul: dict[int, dict]) -> None:
    """floor_ms: model FLOPs / measured fp32 matmul FLOP/s at the same thread count (a compute lower bound)."""
    for r in rows:
        mm = matmul.get(r.get("threads") or -1)
        if mm and r.get("batch"):
            r["floor_ms"] = flops_per_image * r["batch"] / mm["flops_per_s"] * 1000
            if "p50_ms" in r:
                r["x_floor"] = r["p50_ms"] / r["floor_ms"]
                r["gflops_per_s"] = flops_per_image * r["batch"] / (r["p50_ms"] / 1000) / 1e9


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    """The markdown table shared by latency.md and the on-device benchmarks (benchmarks/device)."""
    lines = ["| runtime | artifact | precision | batch | threads | load s | p50 ms | p90 ms | p99 ms | img/s | "
             "peak RSS MB | floor ms | p50 / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {RUNTIME_LABELS.get(r['runtime'], r['runtime'])} | {r.get('artifact', '')} | "
                f"{r.get('precision', '')} | {r.get('batch') or ''} | {r.get('threads') or ''} | ")
        load, rss, floor = _f(r.get("load_s"), ".2f"), _f(r.get("peak_rss_mb"), ".0f"), _f(r.get("floor_ms"), ".2f")
        if r.get("status", "ok") != "ok":
            lines.append(head + f"{load} | {r['status']} | | | | {rss} | {floor} | |")
            continue
        lines.append(head + f"{load} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                            f"{_f(r.get('images_per_s'), '.1f')} | {rss} | {floor} | {_f(r.get('x_floor'), '.1f')} |")
    return "\n".join(lines)


def format_markdown(doc: dict) -> str:
    m, st = doc["machine"], doc["settings"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    mm = "; ".join(f"{t} thread(s): {d['flops_per_s'] / 1e9:.1f} GFLOP/s (fp32 matmul {d['n']}x{d['n']})"
                   for t, d in sorted(doc["matmul"].items(), key=lambda kv: int(kv[0])))
    load = doc["load_average"]
    busy = (f"\n\n**Warning: the machine was busy (1-min load average {load['before'][0]:.2f} before, "
            f"{load['after'][0]:.2f} after, on {m['usable_cores']} cores): timings include contention.**"
            if max(load["before"][0], load["after"][0]) > 0.5 else "")
    return (f"# Inference latency: {doc['run']}\n\n"
            f"Model {doc['arch']} at {doc['input_size']} px, {doc['num_classes']} classes: "
            f"{doc['flops_per_image'] / 1e9:.3f} GFLOPs per image.\n\n"
            f"Machine: {m['cpu']} ({m['usable_cores']} usable cores; SIMD: {', '.join(m['cpu_flags']) or 'n/a'}), "
            f"{m['platform']}.\nVersions: {v}.\nFloor (compute limit): {mm}.{busy}\n\n"
            f"Each row: warm-up, then runs for {st['time_box']} s (at least {st['min_runs']}, "
            f"at most {st['max_runs']} runs) on random input; p50/p90/p99 latency per call (whole batch); "
            f"img/s = images per second of measured time; peak RSS = max resident memory of the measuring process "
            f"({'one process per runtime, so cumulative over its rows' if st['group'] else 'one process per row'}); "
            f"load = time to a usable model: session/program creation, checkpoint to model (+ compilation for "
            f"torch.compile, also as compile_s in the JSON; rss_after_import_mb there is the runtime before the "
            f"model); "
            f"floor = FLOPs / matmul FLOP/s at the same threads, p50 / floor = how far from that limit.\n\n"
            f"{format_table(doc['rows'])}\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    labels = [f"{RUNTIME_LABELS.get(r['runtime'], r['runtime'])} {r.get('precision', '')} b{r['batch']} t{r['threads']}"
              for r in ok]
    per_img = [r["p50_ms"] / r["batch"] for r in ok]
    floors = [r.get("floor_ms", 0) / r["batch"] for r in ok]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(ok) + 1.5))
    y = range(len(ok))
    ax.barh(list(y), per_img, color="tab:blue", label="p50 ms per image")
    ax.scatter(floors, list(y), color="black", marker="|", s=200, label="compute floor (FLOPs / matmul FLOP/s)",
               zorder=3)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (p50 / batch)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__, epilog=NOTES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name: reads runs/<name>/export/manifest.json and runs/<name>/best.pt")
    p.add_argument("--runs", default="runs", help="parent folder of runs (default runs)")
    p.add_argument("--export-dir", help="export folder (default <run>/export)")
    p.add_argument("--checkpoint", help="checkpoint for eager/compile (default <export>/../best.pt)")
    p.add_argument("--out", help="output folder (default <run>/bench)")
    p.add_argument("--runtimes", help=f"comma list of {','.join(DEFAULT_RUNTIMES)} (default all; --quick: no compile)")
    p.add_argument("--select", help="only artifacts whose file name contains this, e.g. fp32 (best.pt rows stay)")
    p.add_argument("--batch", type=int, default=None, help="the larger batch (default 16; --quick 2); batch 1 always")
    p.add_argument("--threads", default=None, help="comma list of thread counts (default 1,<all cores>; --quick 1)")
    p.add_argument("--time-box", type=float, default=None, help="seconds of timed runs per row (default 3)")
    p.add_argument("--max-runs", type=int, default=None, help="runs per row at most (default 200)")
    p.add_argument("--min-runs", type=int, default=None, help="runs per row at least (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker process before it counts as failed")
    p.add_argument("--group", action="store_true", help="one process per runtime instead of per row (faster)")
    p.add_argument("--no-check-sha", action="store_true",
                   help="skip the sha256 check of artifacts against the manifest")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="seconds, for tests: batch 1+2, 1 thread, 0.3 s per row")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = get_args_parser().parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    from cellcore.manifest import ManifestError, read_manifest

    if args.export_dir:
        export_dir = Path(args.export_dir)
        run_dir = export_dir.parent
    elif args.run:
        run_dir = Path(args.run) if Path(args.run).is_dir() and not (Path(args.runs) / args.run).is_dir() \
            else Path(args.runs) / args.run
        export_dir = run_dir / "export"
    else:
        log.error("pass --run <name> (or --export-dir)")
        return 2
    try:
        manifest = read_manifest(export_dir)
    except ManifestError as exc:
        log.error("%s", exc)
        return 2
    checkpoint = Path(args.checkpoint) if args.checkpoint else export_dir.parent / "best.pt"
    out = Path(args.out) if args.out else run_dir / "bench"
    q = args.quick
    runtimes = tuple(s.strip() for s in args.runtimes.split(",")) if args.runtimes else (
        QUICK_RUNTIMES if q else DEFAULT_RUNTIMES)
    bad = [r for r in runtimes if r not in DEFAULT_RUNTIMES]
    if bad:
        log.error("unknown runtime(s) %s; valid: %s", ", ".join(bad), ", ".join(DEFAULT_RUNTIMES))
        return 2
    cores = usable_cores()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else ([1] if q else sorted({1, cores}))
    big = args.batch or (2 if q else 16)
    batches = [1] + ([big] if big != 1 else [])
    settings = {"time_box": args.time_box or (0.3 if q else 3.0), "max_runs": args.max_runs or (20 if q else 200),
                "min_runs": args.min_runs or (3 if q else 10), "warmup": args.warmup or (1 if q else 5),
                "group": bool(args.group or q), "batches": batches, "threads": threads, "runtimes": list(runtimes)}
    arch = manifest["model"]["arch"]
    size = int(manifest["input"]["shape"][-1])
    num_classes = len(manifest["classes"])
    from benchmarks.flops import arch_cost

    flops = arch_cost(arch, num_classes, size)["flops"]
    load_before = os.getloadavg()
    jobs, static_rows = plan_jobs(manifest, export_dir, checkpoint, runtimes, batches, threads,
                                  check_sha=not args.no_check_sha, select=args.select)
    common = {k: settings[k] for k in ("time_box", "max_runs", "min_runs", "warmup")}
    matmul_rows = spawn({"runtime": "matmul", "configs": [{"threads": t} for t in threads],
                         "matmul_n": 512 if q else 2048, "time_box": 0.3 if q else 1.5}, args.timeout)
    matmul = {r["threads"]: r for r in matmul_rows if r.get("status") == "ok"}
    rows: list[dict] = []
    for job in jobs:
        spec = {**job, **common, "input_size": size}
        if settings["group"]:
            rows += spawn(spec, args.timeout)
        else:
            for cfg in job["configs"]:
                rows += spawn({**spec, "configs": [cfg]}, args.timeout)
    rows += static_rows
    add_floor(rows, flops, matmul)
    doc = {"run": str(run_dir), "arch": arch, "input_size": size, "num_classes": num_classes,
           "flops_per_image": flops, "machine": machine_info(), "settings": settings,
           "matmul": {str(k): v for k, v in matmul.items()},
           "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(doc, indent=1))
    md = format_markdown(doc)
    (out / "latency.md").write_text(md)
    if not args.no_plot:
        plot(rows, out / "latency.png", f"{arch} {size}px on {doc['machine']['cpu']}")
    print(format_table(rows))
    log.info("wrote %s", out / "latency.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
