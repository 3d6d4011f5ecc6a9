"""The paper's Tables 1 and 2 (params, FLOPs, accuracy, macro-F1, training time) from this repo's own runs/."""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Table 1: MobileViT against the heavy CNNs; Table 2: against the lightweight networks (as in the paper).
TABLE1 = ["resnet50", "densenet121", "mobilevit_xs"]
TABLE2 = ["mobilenet_v2", "mobilenet_v3_large", "mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
TABLE_ARCHS = list(dict.fromkeys(TABLE1 + TABLE2))
NOT_TRAINED = "not trained"
DISPLAY = {"resnet50": "ResNet50", "densenet121": "DenseNet121", "mobilenet_v2": "MobileNetV2",
           "mobilenet_v3_large": "MobileNetV3-Large", "mobilevit_xxs": "MobileViT-XXS", "mobilevit_xs": "MobileViT-XS",
           "mobilevit_s": "MobileViT-S"}


@dataclass
class RunInfo:
    """What a finished (or interrupted) training run folder says about itself."""

    name: str                # path relative to the runs root, e.g. "table_cpu_resnet50"
    arch: str
    preset: str
    image_size: int
    epochs_planned: int
    epochs_done: int
    fingerprint: str | None  # split.json "fingerprint": which data the run saw
    num_classes: int | None
    best_epoch: int
    val_acc: float
    val_macro_f1: float
    train_time_s: float      # metrics.csv elapsed_s of the last epoch (training + validation wall time)
    train_images_per_s: float
    device: str = ""         # from train.log ("device=cpu", "device=cuda:0"), when the log has it

    @property
    def complete(self) -> bool:
        return self.epochs_done >= self.epochs_planned


def read_run(run_dir: Path, runs_root: Path) -> RunInfo | None:
    """A run folder -> RunInfo, or None when it holds no finished epoch (or is not a training run)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("skipping %s: unreadable config.yaml (%s)", run_dir, exc)
        return None
    if not isinstance(cfg, dict) or "arch" not in cfg:
        return None
    rows = _read_metrics(run_dir / "metrics.csv")
    if not rows:
        log.info("skipping %s: no finished epoch in metrics.csv", run_dir)
        return None
    best = max(rows, key=lambda r: r["val_macro_f1"])  # the epoch best.pt holds (train.engine keeps max macro-F1)
    fingerprint, num_classes = None, None
    split = run_dir / "split.json"
    if split.exists():
        try:
            data = json.loads(split.read_text())
            fingerprint, num_classes = data.get("fingerprint"), len(data.get("classes", [])) or None
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable split.json (%s)", run_dir, exc)
    return RunInfo(name=str(run_dir.relative_to(runs_root)), arch=str(cfg["arch"]), preset=str(cfg.get("preset", "")),
                   device=_device_from_log(run_dir / "train.log"),
                   image_size=int(cfg.get("image_size", 0)), epochs_planned=int(cfg.get("epochs", len(rows))),
                   epochs_done=int(rows[-1]["epoch"]), fingerprint=fingerprint, num_classes=num_classes,
                   best_epoch=int(best["epoch"]), val_acc=best["val_acc"], val_macro_f1=best["val_macro_f1"],
                   train_time_s=rows[-1]["elapsed_s"], train_images_per_s=rows[-1].get("train_images_per_s", 0.0))


def _device_from_log(path: Path) -> str:
    """train.engine.fit logs 'preset=... device=<d> world=<n>' once per start; the last start wins."""
    try:
        found = re.findall(r" device=(\S+) world=(\d+)", path.read_text(errors="replace"))
    except OSError:
        return ""
    if not found:
        return ""
    dev, world = found[-1]
    return dev if world == "1" else f"{world}x {dev}"


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                out.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if k and v != ""})
            except ValueError:
                continue
    return [r for r in out if {"epoch", "val_acc", "val_macro_f1", "elapsed_s"} <= set(r)]


def find_runs(runs_root: Path, include: str = "*", exclude: str | None = None) -> list[RunInfo]:
    """Every run folder (any depth) under runs_root with a config.yaml and at least one finished epoch."""
    runs = []
    for cfg in sorted(runs_root.rglob("config.yaml")):
        run_dir = cfg.parent
        rel = str(run_dir.relative_to(runs_root))
        if not fnmatch.fnmatch(rel, include) or (exclude and fnmatch.fnmatch(rel, exclude)):
            continue
        info = read_run(run_dir, runs_root)
        if info is not None:
            runs.append(info)
    return runs


def resolve_fingerprint(data: str) -> str:
    """--data: a dataset folder/zip (fingerprinted as train does, without a class map) or a fingerprint (prefix)."""
    if re.fullmatch(r"[0-9a-f]{8,64}", data) and not Path(data).exists():
        return data
    from train.data import scan_dataset

    return scan_dataset(data).fingerprint()


def select_runs(runs: list[RunInfo], preset: str | None = None, fingerprint: str | None = None) -> dict[str, RunInfo]:
    """arch -> the run shown in the tables: among matching runs, the highest validation macro-F1."""
    chosen: dict[str, RunInfo] = {}
    for r in runs:
        if preset and r.preset != preset:
            continue
        if fingerprint and not (r.fingerprint or "").startswith(fingerprint):
            continue
        if r.arch not in chosen or r.val_macro_f1 > chosen[r.arch].val_macro_f1:
            chosen[r.arch] = r
    return chosen


def build_tables(costs: dict[str, dict], chosen: dict[str, RunInfo], all_runs: list[RunInfo]) -> dict:
    """The JSON document: per arch, params/FLOPs always, metrics only from a run of this repo."""
    models = {}
    for arch in TABLE_ARCHS:
        c = costs[arch]
        run = chosen.get(arch)
        entry = {"arch": arch, "name": DISPLAY.get(arch, arch), "params": c["params"], "flops": c["flops"],
                 "flops_input_size": c["input_size"], "flops_num_classes": c["num_classes"],
                 "status": "trained" if run else NOT_TRAINED, "run": asdict(run) if run else None,
                 "other_runs": sorted(r.name for r in all_runs if r.arch == arch and (not run or r.name != run.name))}
        models[arch] = entry
    return {"table1": TABLE1, "table2": TABLE2, "models": models}


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_markdown(doc: dict, filters: dict) -> str:
    def table(title: str, archs: list[str]) -> list[str]:
        lines = [f"## {title}", "",
                 "| Model | Params (M) | FLOPs (G) | Accuracy (%) | Macro-F1 (%) | Training time | Trained at | Epochs "
                 "| Run |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for arch in archs:
            m = doc["models"][arch]
            head = f"| {m['name']} | {m['params'] / 1e6:.2f} | {m['flops'] / 1e9:.2f} "
            r = m["run"]
            if r is None:
                lines.append(head + f"| {NOT_TRAINED} | {NOT_TRAINED} | {NOT_TRAINED} | | | |")
                continue
            epochs = f"{r['epochs_done']}/{r['epochs_planned']}" + ("" if r["epochs_done"] >= r["epochs_planned"]
                                                                     else " (incomplete)")
            lines.append(head + f"| {r['val_acc'] * 100:.2f} | {r['val_macro_f1'] * 100:.2f} | "
                         f"{_fmt_time(r['train_time_s'])} | {r['image_size']} px, preset {r['preset'] or '-'}"
                         f"{', ' + r['device'] if r.get('device') else ''} | "
                         f"{epochs} | `{r['name']}` |")
        return lines

    some = next(iter(doc["models"].values()))
    filt = ", ".join(f"{k}={v}" for k, v in filters.items() if v) or "none"
    out = ["# Paper tables, reproduced from this repository's runs", "",
           f"Params and FLOPs: this code's networks with {some['flops_num_classes']} classes, batch 1, FLOPs = 2 x "
           "multiply-accumulates (benchmarks/flops.py) at the paper's input size (224 px CNNs, 256 px MobileViT).",
           "Accuracy and macro-F1: validation split of the run at its best epoch (the epoch best.pt holds); training "
           "time: wall time of the whole run (metrics.csv elapsed_s). A model without a run says "
           f"\"{NOT_TRAINED}\": no number is ever copied from the paper.", f"Run filters: {filt}.", ""]
    out += table("Table 1. MobileViT vs. heavy CNNs", doc["table1"]) + [""]
    out += table("Table 2. MobileViT vs. lightweight networks", doc["table2"]) + [""]
    return "\n".join(out)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_tables", description=__doc__)
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for run folders with config.yaml")
    p.add_argument("--out", default="runs/bench", help="folder for paper_tables.md and paper_tables.json")
    p.add_argument("--preset", help="only runs trained with this preset (config.yaml 'preset')")
    p.add_argument("--data", help="only runs on this dataset: a data folder/zip, or its fingerprint (split.json)")
    p.add_argument("--include", default="*", help="glob on run names relative to --runs, e.g. 'table_cpu_*'")
    p.add_argument("--exclude", default=None, help="glob on run names to leave out")
    p.add_argument("--num-classes", type=int, default=8, help="classes for the params/FLOPs columns")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    runs_root, out = Path(args.runs), Path(args.out)
    if not runs_root.is_dir():
        log.error("runs folder not found: %s", runs_root)
        return 2
    fingerprint = None
    if args.data:
        try:
            fingerprint = resolve_fingerprint(args.data)
        except ValueError as exc:  # train.data.DatasetError
            log.error("%s", exc)
            return 2
    runs = find_runs(runs_root, args.include, args.exclude)
    chosen = select_runs(runs, args.preset, fingerprint)
    log.info("%d run(s) found, %d architecture(s) with a matching run: %s", len(runs), len(chosen),
             ", ".join(f"{a}={r.name}" for a, r in chosen.items()) or "none")
    from benchmarks.flops import arch_cost

    costs = {a: arch_cost(a, args.num_classes) for a in TABLE_ARCHS}
    doc = build_tables(costs, chosen, runs)
    filters = {"preset": args.preset, "data fingerprint": fingerprint, "include": None if args.include == "*"
               else args.include, "exclude": args.exclude}
    doc["filters"] = filters
    out.mkdir(parents=True, exist_ok=True)
    md = format_markdown(doc, filters)
    (out / "paper_tables.json").write_text(json.dumps(doc, indent=1))
    (out / "paper_tables.md").write_text(md)
    print(md)
    log.info("wrote %s and %s", out / "paper_tables.md", out / "paper_tables.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
