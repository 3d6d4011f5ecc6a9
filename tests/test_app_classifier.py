"""The app's classifier (exported model, torch-free path) gives the PyTorch checkpoint's top-1 on real photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellcore.uncertainty import rule_for, softmax
from tests.fixtures_app import images as img
from mobile_app import cli
from mobile_app.classifier import UNCERTAIN_MESSAGE, CellClassifier

N_IMAGES = 50
TIE = 1e-4  # a top-1 flip is only tolerated between classes whose PyTorch logits are this close


@pytest.fixture(scope="module")
def photos(pbc_dev: Path) -> list[Path]:
    paths = img.real_images(pbc_dev, per_class=7)[:N_IMAGES]
    assert len(paths) == N_IMAGES
    return paths


@pytest.fixture(scope="module")
def torch_logits(smoke_export: Path, photos: list[Path]) -> np.ndarray:
    """[N, C] logits of the checkpoint, fed exactly as training feeds it."""
    torch = pytest.importorskip("torch")
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import load_rgb

    model, prep, classes = model_from_checkpoint(load_checkpoint(smoke_export.parent / "best.pt"))
    manifest = json.loads((smoke_export / "manifest.json").read_text())
    assert classes == manifest["classes"]
    batch = np.stack([np.asarray(prep.apply(load_rgb(p)), dtype=np.uint8) for p in photos])  # [N, S, S, 3] uint8
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)  # [N, 3, S, S] float32 in 0..1
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_top1_agrees_with_pytorch_checkpoint(fmt: str, smoke_export: Path, photos: list[Path],
                                             torch_logits: np.ndarray, record_property) -> None:
    if fmt == "executorch":
        pytest.importorskip("executorch.runtime")
    clf = CellClassifier(smoke_export, fmt=fmt, platform="desktop")
    preds = [clf.classify(p) for p in photos]
    classes = clf.manifest.classes
    app_top1 = np.array([classes.index(p.label) for p in preds])
    ref_top1 = torch_logits.argmax(1)
    agree = int((app_top1 == ref_top1).sum())
    rule = rule_for(clf.manifest.raw, clf.artifact.file)  # the app's probabilities are calibrated (temperature)
    assert rule.temperature != 1.0  # the smoke model's fitted T: a test that would pass uncalibrated is no test
    ref_probs = softmax(torch_logits, rule.temperature)
    max_prob_diff = float(np.abs(np.array([p.probabilities for p in preds]) - ref_probs).max())
    record_property(f"top1_agreement_{fmt}", f"{agree}/{len(photos)}")
    record_property(f"max_prob_diff_{fmt}", max_prob_diff)
    print(f"\n{fmt}: top-1 agrees with the PyTorch checkpoint on {agree}/{len(photos)} real images, "
          f"max |p_app - p_torch| = {max_prob_diff:.2e}")
    for i in np.flatnonzero(app_top1 != ref_top1):  # only near-ties may flip
        gap = abs(torch_logits[i, app_top1[i]] - torch_logits[i, ref_top1[i]])
        assert gap < TIE, f"{photos[i].name}: app says {classes[app_top1[i]]}, PyTorch {classes[ref_top1[i]]}"
    assert max_prob_diff < 1e-3
    assert all(p.uncertain == rule.uncertain(p.probability, p.problems) for p in preds)
    assert all(p.threshold == rule.threshold for p in preds)
    # real PBC photos pass the picture checks; the one reason left is the feature distance (rule step 5), and
    # the message names it
    assert all(pr.startswith("unlike the training cells") for p in preds for pr in p.problems)
    assert all(p.message == "" if not p.uncertain else p.message.startswith(UNCERTAIN_MESSAGE)
               and all(pr in p.message for pr in p.problems) for p in preds)


def test_cli_json_and_folders(smoke_export: Path, pbc_dev: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "cells"
    folder.mkdir()
    for p in img.real_images(pbc_dev, per_class=1)[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "readme.txt").write_text("not an image, ignored when a folder is expanded")
    assert cli.main(["classify", "--json", "--model-dir", str(smoke_export), str(folder)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder.glob("*.jpg"))
    for r in rows:
        assert len(r["top"]) == 3 and r["top"][0][0] == r["label"] and r["inference_ms"] > 0
        assert r["uncertain"] == (bool(r["problems"]) or r["threshold"] is None or r["probability"] < r["threshold"])
    # a labelled folder, one subfolder per class as training reads it: its subfolders' photos, in order
    labelled = tmp_path / "labelled"
    for p in img.real_images(pbc_dev, per_class=1)[:2]:
        (labelled / p.parent.name).mkdir(parents=True)
        (labelled / p.parent.name / p.name).write_bytes(p.read_bytes())
    assert cli.main(["classify", "--json", "--model-dir", str(smoke_export), str(labelled)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).relative_to(labelled).as_posix() for r in rows] == sorted(
        f.relative_to(labelled).as_posix() for f in labelled.rglob("*.jpg"))


def test_bundle_copies_one_verified_model(smoke_export: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "assets" / "model"
    # the smoke export is not verified (its tiny model would fail gates by chance): say so explicitly
    args = ["bundle", "--model-dir", str(smoke_export), "--dest", str(dest), "--allow-unverified"]
    assert cli.main([*args, "--format", "executorch"]) == 0  # an earlier bundle ...
    assert cli.main([*args, "--format", "onnx", "--precision", "int8"]) == 0  # ... is replaced whole
    assert sorted(p.name for p in dest.iterdir()) == ["MODEL_CARD.md", "manifest.json", "mobilevit_xxs_onnx_int8.onnx"]
    clf = CellClassifier(dest, platform="desktop")  # the bundled folder works on its own
    assert clf.load().name == "onnxruntime" and clf.artifact.file == "mobilevit_xxs_onnx_int8.onnx"
    card = (dest / "MODEL_CARD.md").read_text()
    m = json.loads((dest / "manifest.json").read_text())
    assert card.startswith("# Model card: mobilevit_xxs_onnx_int8.onnx") and m["notice"] in card
    assert m["dataset"]["fingerprint"][:16] in card and "## Training data and licence" in card
    assert "nothing here ran on a real phone" in card and "| this file |" in card


@pytest.mark.parametrize("case", ["foreign folder", "unverified"])
def test_bundle_refuses_a_foreign_folder_and_an_unverified_model(case: str, smoke_export: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "app_source"
    dest.mkdir()
    (dest / "ui.py").write_text("# the app's own source: must never be deleted by bundle\n")
    extra = ["--allow-unverified"] if case == "foreign folder" else []
    model_dir = smoke_export
    if case == "unverified":
        (dest / "ui.py").unlink()
        # a copy without verify results: the shared smoke export is verified by test_export whenever that ran first
        model_dir = tmp_path / "unverified_export"
        shutil.copytree(smoke_export, model_dir)
        m = json.loads((model_dir / "manifest.json").read_text())
        m.setdefault("metrics", {}).pop("verify", None)
        (model_dir / "manifest.json").write_text(json.dumps(m))
    rc = cli.main(["bundle", "--model-dir", str(model_dir), "--format", "onnx", "--dest", str(dest), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    if case == "foreign folder":
        assert "not an earlier model bundle (ui.py)" in err and (dest / "ui.py").exists()
    else:
        assert "not been verified" in err and "--allow-unverified" in err and not any(dest.iterdir())
