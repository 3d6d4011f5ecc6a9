"""benchmarks.train_speed: model and real-data loader rates side by side, on a few tiny steps."""
from __future__ import annotations

import json
from pathlib import Path


def test_train_speed_tiny(pbc_dev: Path, tmp_path: Path):
    from benchmarks.train_speed import main

    rc = main(["--preset", "smoke", "--arch", "mobilenet_v2", "--data", str(pbc_dev), "--per-class", "2",
               "--image-size", "32", "--batch", "4", "--steps", "1", "--warmup", "0", "--workers", "1",
               "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "train_speed.json").read_text())
    p = doc["presets"][0]
    assert p["preset"] == "smoke" and p["image_size"] == 32 and p["batch_size"] == 4
    assert p["cache"]["images"] == 16 and p["cache"]["decode_images_per_s"] > 0  # 2 real images x 8 classes
    assert p["loader"]["images_per_s"] > 0 and p["models"][0]["images_per_s"] > 0
    md = (tmp_path / "train_speed.md").read_text()
    assert "loader / model" in md and "| mobilenet_v2 |" in md


def test_train_speed_rejects_unknown_arch(tmp_path: Path):
    from benchmarks.train_speed import main

    assert main(["--arch", "vgg", "--out", str(tmp_path)]) == 2
