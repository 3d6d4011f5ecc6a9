"""Train every backbone of the paper's tables with one preset on one dataset, one after another."""
from __future__ import annotations

import argparse
import csv
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_dir_for(runs_root: Path, preset: str, arch: str) -> Path:
    return runs_root / f"table_{preset}_{arch}"


def run_state(run_dir: Path) -> str:
    """'new' (nothing there), 'complete' (all planned epochs in metrics.csv) or 'partial' (last.pt, resumable)."""
    if not (run_dir / "last.pt").exists():
        return "new"
    try:
        import yaml

        planned = int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("epochs", 0))
        with open(run_dir / "metrics.csv", newline="") as f:
            done = max((int(r["epoch"]) for r in csv.DictReader(f)), default=0)
    except (OSError, ValueError, KeyError):
        return "partial"
    return "complete" if planned and done >= planned else "partial"


def build_commands(archs: list[str], preset: str, data: str, runs_root: Path, extra: list[str],
                   python: str = sys.executable) -> list[tuple[str, Path, list[str]]]:
    """[(arch, run_dir, argv)]: `python -m train --arch X --preset P --data D --run-dir runs/table_P_X [extra]`."""
    out = []
    for arch in archs:
        rd = run_dir_for(runs_root, preset, arch)
        cmd = [python, "-m", "train", "--arch", arch, "--preset", preset, "--data", data, "--run-dir", str(rd), *extra]
        out.append((arch, rd, cmd))
    return out


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.paper_tables import TABLE_ARCHS

    p = argparse.ArgumentParser(prog="python -m benchmarks.train_all", description=__doc__)
    p.add_argument("--preset", required=True, help="train preset for every backbone (paper needs a GPU; cpu; smoke)")
    p.add_argument("--data", required=True, help="dataset folder or .zip")
    p.add_argument("--arch", action="append", help=f"architecture (repeatable; default: {' '.join(TABLE_ARCHS)})")
    p.add_argument("--runs", default="runs", help="parent of the run folders runs/table_<preset>_<arch>")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--keep-going", action="store_true", help="after a failed backbone, go on with the next")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `python -m train` flags, e.g. -- --epochs 5")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    from benchmarks.paper_tables import TABLE_ARCHS
    from train.config import PRESETS
    from train.models import ARCHS

    archs = args.arch or TABLE_ARCHS
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        log.error("unknown architecture(s) %s; valid: %s", ", ".join(bad), ", ".join(ARCHS))
        return 2
    if args.preset not in PRESETS:
        log.error("unknown preset %r; valid: %s", args.preset, ", ".join(PRESETS))
        return 2
    extra = [a for a in args.extra if a != "--"] if args.extra else []
    commands = build_commands(archs, args.preset, args.data, Path(args.runs), extra)
    if args.dry_run:
        for arch, rd, cmd in commands:
            state = run_state(rd)
            note = {"new": "", "complete": "  # already complete: would be skipped",
                    "partial": "  # unfinished: would resume"}[state]
            print(shlex.join(cmd + (["--resume"] if state == "partial" else [])) + note)
        return 0
    failed = []
    for i, (arch, rd, cmd) in enumerate(commands, 1):
        state = run_state(rd)
        if state == "complete":
            log.info("[%d/%d] %s: %s already complete, skipped", i, len(commands), arch, rd)
            continue
        if state == "partial":
            cmd = cmd + ["--resume"]
        log.info("[%d/%d] %s: %s", i, len(commands), arch, shlex.join(cmd))
        t0 = time.time()
        rc = subprocess.call(cmd)
        log.info("[%d/%d] %s: exit %d after %.1f min", i, len(commands), arch, rc, (time.time() - t0) / 60)
        if rc != 0:
            failed.append(arch)
            if not args.keep_going:
                log.error("%s failed; stopping (pass --keep-going to continue with the others)", arch)
                return rc
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    log.info("done; tables: python -m benchmarks.paper_tables --include 'table_%s_*'", args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
