"""benchmarks.gpu_train for real on CPU, tiny: model step eager vs compiled, an end-to-end run, the augment mode."""
from __future__ import annotations

import json
from pathlib import Path

TINY = ["--device", "cpu", "--arch", "mobilevit_xxs", "--image-size", "64", "--workers", "1", "--threads", "1"]


def test_gpu_train_speed_tiny_on_cpu(pbc_sample: Path, tmp_path: Path) -> None:
    from benchmarks.gpu_train import main

    # backend "eager": torch.compile's graph capture for real, without Inductor's minutes of C++ compile on CPU
    rc = main(["--data", str(pbc_sample), *TINY, "--batches", "4", "--steps", "2", "--warmup", "1",
               "--compile-backend", "eager", "--epochs", "2", "--max-steps-per-epoch", "2", "--per-class", "2",
               "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "gpu_train.json").read_text())
    rows = {(r["batch"], r["mode"]): r for r in doc["model_step"]}
    assert set(rows) == {(4, "eager"), (4, "compiled")}
    assert all(r["images_per_s"] > 0 and r["precision"] == "fp32" for r in rows.values())
    assert rows[(4, "compiled")]["compiled"] and rows[(4, "compiled")]["first_step_s"] > 0
    assert doc["data_path"]["images_per_s"] > 0 and doc["data_path"]["resident_on_gpu"] is False
    e2e = doc["e2e"]
    assert (e2e["preset"], e2e["arch"], e2e["image_size"], e2e["batch_size"]) == ("paper", "mobilevit_xxs", 64, 4)
    assert e2e["epochs"] == 2 and e2e["compile"] == "auto"
    assert e2e["first_step_s"].keys() == {"eager"}  # auto: off on CPU
    assert e2e["steady_train_images_per_s"] > 0 and e2e["steady_epoch_s"] > 0
    c = doc["comparison"]
    assert c["model_step_mode"] == "eager" and 0 < c["model_over_e2e"]
    assert abs(c["share_outside_model_step"] - (1 - 1 / c["model_over_e2e"])) < 1e-9
    md = (tmp_path / "gpu_train.md").read_text()
    for fragment in ("| 4 | eager |", "| 4 | compiled |", "training img/s", "outside the model step",
                     "Device: **CPU**"):
        assert fragment in md, fragment
    assert (tmp_path / "runs" / "e2e_paper" / "best.pt").exists()


def test_gpu_train_augment_mode_tiny_on_cpu(pbc_sample: Path, tmp_path: Path) -> None:
    from benchmarks.gpu_train import main

    rc = main(["--mode", "augment", "--data", str(pbc_sample), "--device", "cpu", "--workers", "1",
               "--candidate", "cells:--preset paper --augment cells",
               "--candidate", "dih:--preset paper --augment dihedral",
               "--train-args", "--arch mobilevit_xxs --image-size 64 --epochs 1 --max-steps-per-epoch 1 --batch-size 8 "
                               "--threads 1",
               "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "gpu_augment.json").read_text())
    by_name = {c["name"]: c for c in doc["candidates"]}
    assert by_name["cells"]["augment"] == "cells" and by_name["dih"]["augment"] == "dihedral"
    for c in by_name.values():
        assert c["rc"] == 0 and c["preset"] == "paper" and c["image_size"] == 64
        assert c["val"]["n"] == 8 and 0 <= c["val"]["accuracy"] <= 1
        assert c["test"]["n"] == 8 and len(c["test"]["accuracy_95ci"]) == 2  # the split's test part, scored
    md = (tmp_path / "gpu_augment.md").read_text()
    assert "| cells | `--preset paper --augment cells` | 1 |" in md and "of 8" in md
