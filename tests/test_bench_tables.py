"""benchmarks.paper_tables reads runs/ (numbers only for trained models) and benchmarks.train_all --dry-run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def fake_run(runs: Path, name: str, arch: str, preset: str, accs: list[tuple[float, float]], epochs: int,
             fingerprint: str = "f" * 64) -> Path:
    """A run folder written with train's own writers (config.yaml, metrics.csv), as fit() leaves it."""
    from train.config import TrainConfig
    from train.engine import METRIC_FIELDS, write_metrics

    rd = runs / name
    rd.mkdir(parents=True)
    TrainConfig(data="/data/x", run_dir=str(rd), preset=preset, arch=arch, epochs=epochs).save(rd / "config.yaml")
    rows = []
    for i, (acc, f1) in enumerate(accs, 1):
        row = {k: 0.0 for k in METRIC_FIELDS}
        row.update(epoch=i, val_acc=acc, val_macro_f1=f1, elapsed_s=600.0 * i, train_images_per_s=50.0)
        rows.append(row)
    write_metrics(rd / "metrics.csv", rows)
    (rd / "split.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(8)], "fingerprint": fingerprint,
                                               "train": [], "val": []}))
    (rd / "last.pt").write_bytes(b"")
    return rd


@pytest.fixture(scope="module")
def warm_flops_cache():
    """Params/FLOPs of the 7 backbones, computed once per session (benchmarks.flops caches them)."""
    from benchmarks.flops import arch_cost
    from benchmarks.paper_tables import TABLE_ARCHS

    return {a: arch_cost(a) for a in TABLE_ARCHS}


def test_tables_from_fake_runs(tmp_path: Path, warm_flops_cache):
    from benchmarks.paper_tables import NOT_TRAINED, main

    runs = tmp_path / "runs"
    fake_run(runs, "table_cpu_mobilevit_xxs", "mobilevit_xxs", "cpu", [(0.80, 0.78), (0.91, 0.90), (0.90, 0.89)], 3)
    fake_run(runs, "table_cpu_resnet50", "resnet50", "cpu", [(0.85, 0.84)], 3)  # interrupted after 1 of 3 epochs
    fake_run(runs, "old/xxs_worse", "mobilevit_xxs", "cpu", [(0.70, 0.60)], 1)
    fake_run(runs, "paper_xs", "mobilevit_xs", "paper", [(0.99, 0.98)], 1, fingerprint="a" * 64)
    (runs / "empty_run").mkdir()
    (runs / "empty_run" / "config.yaml").write_text("arch: densenet121\n")  # started, no epoch finished
    out = tmp_path / "bench"

    assert main(["--runs", str(runs), "--out", str(out), "--preset", "cpu"]) == 0
    doc = json.loads((out / "paper_tables.json").read_text())
    md = (out / "paper_tables.md").read_text()
    m = doc["models"]
    assert m["mobilevit_xxs"]["run"]["name"] == "table_cpu_mobilevit_xxs"  # best macro-F1 of the two cpu runs
    assert m["mobilevit_xxs"]["run"]["val_acc"] == pytest.approx(0.91) and m["mobilevit_xxs"]["run"]["best_epoch"] == 2
    assert m["mobilevit_xxs"]["other_runs"] == ["old/xxs_worse"]
    assert m["resnet50"]["status"] == "trained" and "1/3 (incomplete)" in md
    assert m["mobilevit_xs"]["status"] == NOT_TRAINED  # its only run is preset paper, filtered out
    for arch in ("densenet121", "mobilenet_v2", "mobilenet_v3_large", "mobilevit_s", "mobilevit_xs"):
        assert m[arch]["status"] == NOT_TRAINED and m[arch]["run"] is None
    xxs_line = next(ln for ln in md.splitlines() if ln.startswith("| MobileViT-XXS |"))
    assert "| 91.00 | 90.00 | 30.0 min |" in xxs_line and "table_cpu_mobilevit_xxs" in xxs_line
    dn_line = next(ln for ln in md.splitlines() if ln.startswith("| DenseNet121 |"))
    assert dn_line.count(NOT_TRAINED) == 3 and "5.67" in dn_line  # FLOPs are always shown, accuracy never invented
    assert "Table 1" in md and "Table 2" in md

    # data filter by fingerprint prefix: only the paper run matches
    assert main(["--runs", str(runs), "--out", str(out), "--data", "aaaaaaaa"]) == 0
    m = json.loads((out / "paper_tables.json").read_text())["models"]
    assert m["mobilevit_xs"]["status"] == "trained" and m["mobilevit_xxs"]["status"] == NOT_TRAINED


def test_tables_from_a_real_tiny_run(smoke_run: Path, pbc_sample: Path, tmp_path: Path, warm_flops_cache):
    """conftest's real `python -m train --preset smoke` run on 12 images/class of pbc_dev."""
    from benchmarks.paper_tables import NOT_TRAINED, main

    out = tmp_path / "bench"
    # --data as a folder: fingerprinted like train does, must match the run's split.json
    assert main(["--runs", str(smoke_run.parent), "--out", str(out), "--data", str(pbc_sample)]) == 0
    m = json.loads((out / "paper_tables.json").read_text())["models"]
    run = m["mobilevit_xxs"]["run"]
    assert run["name"] == smoke_run.name and run["epochs_done"] == run["epochs_planned"]
    assert 0.0 <= run["val_acc"] <= 1.0 and run["train_time_s"] > 0 and run["preset"] == "smoke"
    assert run["device"] == "cpu" and run["num_classes"] == 8
    assert all(m[a]["status"] == NOT_TRAINED for a in m if a != "mobilevit_xxs")
    md = (out / "paper_tables.md").read_text()
    assert f"{run['val_acc'] * 100:.2f}" in md and "64 px, preset smoke, cpu" in md
    # another dataset: the run no longer matches
    assert main(["--runs", str(smoke_run.parent), "--out", str(out), "--data", "0123abcd"]) == 0
    assert json.loads((out / "paper_tables.json").read_text())["models"]["mobilevit_xxs"]["status"] == NOT_TRAINED


def test_train_all_dry_run(tmp_path: Path, capsys):
    from benchmarks.paper_tables import TABLE_ARCHS
    from benchmarks.train_all import main

    runs = tmp_path / "runs"
    fake_run(runs, "table_cpu_resnet50", "resnet50", "cpu", [(0.8, 0.8)], 3)  # unfinished -> resumed
    fake_run(runs, "table_cpu_mobilenet_v2", "mobilenet_v2", "cpu", [(0.8, 0.8)], 1)  # complete -> skipped
    assert main(["--preset", "cpu", "--data", "/data/pbc", "--runs", str(runs), "--dry-run",
                 "--", "--epochs", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(TABLE_ARCHS) == 7
    for arch, line in zip(TABLE_ARCHS, lines):
        assert f"-m train --arch {arch} --preset cpu --data /data/pbc --run-dir {runs}/table_cpu_{arch} --epochs 5" \
            in line
    assert lines[0].endswith("--resume  # unfinished: would resume")  # resnet50 comes first (Table 1)
    assert next(ln for ln in lines if "mobilenet_v2" in ln).endswith("# already complete: would be skipped")
    assert main(["--preset", "nope", "--data", "x", "--dry-run"]) == 2
    assert main(["--preset", "cpu", "--data", "x", "--arch", "vgg16", "--dry-run"]) == 2
