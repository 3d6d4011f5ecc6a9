"""benchmarks.robustness: every shift at every strength on a real PBC photo; end to end on the smoke export."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.robustness import LEVELS, SHIFTS, background_colour, conditions, shift_rng, spread_over_classes

CASES = [(name, s) for name in SHIFTS for s in (LEVELS if name != "none" else (1,))]


@pytest.fixture(scope="module")
def photo(pbc_dev: Path) -> Image.Image:
    from train.data import load_rgb

    return load_rgb(sorted((pbc_dev / "lymphocyte").iterdir())[0])


@pytest.mark.parametrize("name,strength", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_shift_rgb_deterministic_and_changes_pixels(photo: Image.Image, name: str, strength: int):
    before = np.asarray(photo).copy()
    a = SHIFTS[name](photo, strength, shift_rng(7, "img.jpg", name, strength))
    b = SHIFTS[name](photo, strength, shift_rng(7, "img.jpg", name, strength))
    assert isinstance(a, Image.Image) and a.mode == "RGB" and a.size == photo.size
    assert np.array_equal(np.asarray(photo), before), "a shift must not modify its input"
    assert np.array_equal(np.asarray(a), np.asarray(b)), "same seed must give the same pixels"
    diff = np.abs(np.asarray(a, dtype=np.int16) - before).mean()
    if name == "none":
        assert diff == 0
    else:
        assert diff > 0.5, f"{name}/{strength} barely changes the photo (mean |diff| {diff:.3f})"


@pytest.mark.parametrize("name", [n for n in SHIFTS if n != "none"])
def test_shift_grows_with_strength(photo: Image.Image, name: str):
    """A stronger level moves the photo further from the original (same seed) than a mild one."""
    ref = np.asarray(photo, dtype=np.float32)
    d = [np.abs(np.asarray(SHIFTS[name](photo, s, shift_rng(3, "k", name, s)), dtype=np.float32) - ref).mean()
         for s in (1, 3)]
    assert d[1] > d[0], f"{name}: strong ({d[1]:.2f}) is not further from the photo than mild ({d[0]:.2f})"


def test_stochastic_shifts_depend_on_seed(photo: Image.Image):
    for name in ("stain", "illumination"):
        a = np.asarray(SHIFTS[name](photo, 2, shift_rng(0, "a.jpg", name, 2)))
        b = np.asarray(SHIFTS[name](photo, 2, shift_rng(0, "b.jpg", name, 2)))
        assert not np.array_equal(a, b), f"{name}: different images got the same random draw"


def test_bad_strength_and_helpers(photo: Image.Image):
    with pytest.raises(ValueError, match="strength"):
        SHIFTS["blur"](photo, 4, shift_rng(0, "k", "blur", 4))
    assert conditions(["blur", "jpeg"], [1, 3]) == [("none", 0), ("blur", 1), ("blur", 3), ("jpeg", 1), ("jpeg", 3)]
    labels = [0] * 10 + [1] * 3 + [2] * 10
    idx = spread_over_classes(labels, 9, seed=0)
    assert idx == spread_over_classes(labels, 9, seed=0) and len(idx) == 9 and len(set(idx)) == 9
    assert sorted(np.bincount([labels[i] for i in idx]).tolist()) == [3, 3, 3]
    bg = background_colour(photo)  # PBC plasma is a pale cream, brighter than the red cells
    assert min(bg) > 150, bg


def test_end_to_end_smoke_export(smoke_export: Path, pbc_dev: Path, tmp_path: Path):
    from benchmarks.robustness import main
    from cellcore.manifest import read_manifest
    from train.data import load_split_samples

    manifest = read_manifest(smoke_export)
    run_dir = smoke_export.parent
    folder = tmp_path / "otherlab"  # a real labelled folder with 2 of the model's classes
    for cls in ("lymphocyte", "neutrophil"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((pbc_dev / cls).iterdir())[-3:]:
            os.symlink(f, folder / cls / f.name)
    out = tmp_path / "bench"
    rc = main(["--run-dir", str(run_dir), "--images", "16", "--shifts", "blur", "jpeg", "--strengths", "mild", "strong",
               "--data", str(folder), "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "robustness.json").read_text())
    md = (out / "robustness.md").read_text()
    assert (out / "robustness.png").stat().st_size > 5000

    n_val = min(16, len(load_split_samples(run_dir / "split.json", "val").paths))  # the smoke split: 8
    runnable = ["best.pt"] + [a["file"] for a in manifest["artifacts"] if a["format"] in ("onnx", "executorch")]
    assert len(runnable) == 5  # pytorch + onnx fp32/int8 + xnnpack fp32/int8
    conds = ["clean", "blur/mild", "blur/strong", "jpeg/mild", "jpeg/strong", "otherlab"]
    assert [c["condition"] for c in doc["conditions"]] == conds
    by = {(r["condition"], r["file"]): r for r in doc["rows"]}
    assert len(doc["rows"]) == len(by) == len(conds) * len(runnable)
    for cond in conds:
        for f in runnable:
            r = by[(cond, f)]
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 and 0.0 <= r["flagged"] <= 1.0
            assert r["accuracy_unflagged"] is None or 0.0 <= r["accuracy_unflagged"] <= 1.0
            assert r["n"] == (6 if cond == "otherlab" else n_val)
            assert r["n_kept"] == round(r["n"] * (1 - r["flagged"]))
    # the same preprocessed array goes to every format: fp32 exports agree with PyTorch exactly
    fp32 = [a["file"] for a in manifest["artifacts"] if a["precision"] == "fp32" and a["format"] != "coreml"]
    for cond in conds:
        for f in fp32:
            assert by[(cond, f)]["confusion_matrix"] == by[(cond, "best.pt")]["confusion_matrix"], (cond, f)
    # the 16 held-out images are spread over all 8 classes
    assert sum(1 for row in by[("clean", "best.pt")]["confusion_matrix"] if sum(row)) == 8
    coreml = [f for f in doc["formats"] if f["format"] == "coreml"]
    assert coreml and all(f["note"] == "needs macOS" for f in coreml)
    assert "needs macOS" in md and "blur/strong" in md and "otherlab" in md
    assert doc["machine"]["cpu"] and "--images 16" in doc["command"]


def test_unknown_class_folder_is_named(smoke_export: Path, pbc_dev: Path, tmp_path: Path):
    from benchmarks.robustness import main

    folder = tmp_path / "lab"
    for cls in ("lymphocyte", "blast"):
        (folder / cls).mkdir(parents=True)
        src = sorted((pbc_dev / "lymphocyte").iterdir())[0]
        shutil.copy(src, folder / cls / src.name)
    from benchmarks.robustness import load_folder

    with pytest.raises(ValueError, match="blast"):
        load_folder(folder, ["lymphocyte", "neutrophil"])
    assert main(["--run-dir", str(smoke_export.parent), "--images", "4", "--shifts", "blur", "--strengths", "1",
                 "--data", str(folder), "--out", str(tmp_path / "b")]) == 2
