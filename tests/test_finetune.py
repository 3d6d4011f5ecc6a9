"""train.finetune on real images: run outputs, the K-shot split, a new class's output, errors; the benchmark summary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.finetune import main, shot_split

SHOTS = 2
# the new lab's folder: real pbc images, 20 onward (the smoke checkpoint saw the first 12 of each class);
# "newcell" (real basophils under a name the checkpoint does not know) must get a new output
NEW_LAB = {"neutrophil": ("neutrophil", 5), "lymphocyte": ("lymphocyte", 3), "monocyte": ("monocyte", 1),
           "newcell": ("basophil", 3)}


@pytest.fixture(scope="module")
def new_lab(pbc_dev: Path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("new_lab")
    for name, (source, n) in NEW_LAB.items():
        (dest / name).mkdir()
        for f in sorted((pbc_dev / source).iterdir())[20:20 + n]:
            os.symlink(f, dest / name / f.name)
    return dest


@pytest.fixture(scope="module")
def ft_run(smoke_run: Path, new_lab: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "ft_k2"
    rc = main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(run_dir),
               "--shots", str(SHOTS), "--epochs", "1", "--seed", "0"])
    assert rc == 0, "fine-tune failed"
    return run_dir


@pytest.mark.parametrize("name", ["best.pt", "split.json", "config.yaml", "finetune.json"])
def test_run_folder_has(ft_run: Path, name: str) -> None:
    assert (ft_run / name).stat().st_size > 0


def test_split_has_k_per_class_and_no_overlap(ft_run: Path) -> None:
    split = json.loads((ft_run / "split.json").read_text())
    train = [tuple(r) for r in split["train"]]
    held = [tuple(r) for r in split["val"]]
    for name, (_, n) in NEW_LAB.items():
        assert sum(c == name for _, c in train) == min(SHOTS, n), name
        assert sum(c == name for _, c in held) == n - min(SHOTS, n), name
    assert not {p for p, _ in train} & {p for p, _ in held}
    result = json.loads((ft_run / "finetune.json").read_text())
    assert (result["train_images"], result["held_out_images"]) == (len(train), len(held))


def test_unknown_class_gets_a_new_output(smoke_run: Path, ft_run: Path) -> None:
    base = load_checkpoint(smoke_run / "best.pt")["classes"]
    assert "newcell" not in base
    ckpt = load_checkpoint(ft_run / "best.pt")
    assert ckpt["classes"] == base + ["newcell"]
    assert json.loads((ft_run / "finetune.json").read_text())["new_classes"] == ["newcell"]
    model, prep, classes = model_from_checkpoint(ckpt, ft_run / "best.pt")
    with torch.no_grad():
        logits = model(torch.rand(2, 3, prep.input_size, prep.input_size))
    assert tuple(logits.shape) == (2, len(base) + 1) == (2, len(classes))


LABELS = [0] * 9 + [1] * 6 + [2] * 2


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shot_split_same_for_a_seed(seed: int) -> None:
    assert shot_split(LABELS, 3, seed) == shot_split(LABELS, 3, seed)


@pytest.mark.parametrize("a,b", [(0, 1), (1, 2), (0, 7)])
def test_shot_split_differs_across_seeds(a: int, b: int) -> None:
    assert shot_split(LABELS, 3, a)[0] != shot_split(LABELS, 3, b)[0]


@pytest.mark.parametrize("bad", ["missing_dir", "empty_dir", "not_a_checkpoint.pt"])
def test_bad_from_exits_2_naming_the_path(bad: str, new_lab: Path, tmp_path: Path, caplog) -> None:
    path = tmp_path / bad
    if bad == "empty_dir":
        path.mkdir()
    elif bad.endswith(".pt"):
        path.write_text("not a checkpoint")
    rc = main(["--from", str(path), "--data", str(new_lab), "--run-dir", str(tmp_path / "out"), "--epochs", "1"])
    assert rc == 2
    assert str(path) in caplog.text
    assert not (tmp_path / "out" / "best.pt").exists()


def test_benchmark_summary_and_table() -> None:
    from benchmarks.finetune_kshot import format_markdown, summarise

    runs = [{"shots": k, "seed": s, "train_images": 4 * k, "held_out_images": 100 - 4 * k,
             "held_out_accuracy": acc, "held_out_macro_f1": acc - 0.1, "wall_s": 10.0 * k, "image_size": 48 * (k // 5)}
            for k, s, acc in [(5, 0, 0.8), (5, 1, 0.9), (10, 0, 0.95)]]
    rows = summarise(runs)
    assert [(r["shots"], r["draws"], r["train_images"]) for r in rows] == [(5, 2, [20]), (10, 1, [40])]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.85) and rows[0]["accuracy_std"] == pytest.approx(0.0707107)
    assert (rows[0]["accuracy_min"], rows[0]["accuracy_max"], rows[1]["accuracy_std"]) == (0.8, 0.9, 0.0)
    md = format_markdown({"from": "r", "data": "d", "command": "c", "epochs": 40, "threads": 0, "summary": rows,
                          "load_average": {"before": 1.0, "after": 2.0},
                          "machine": {"cpu_model": "CPU X", "processor": "", "cpu_count": 2, "usable_cores": 2,
                                      "system": "Linux", "python": "3"}})
    assert "| 5 | 2 | 20 | 80 | 48 | 85.0 ± 7.1 (80.0..90.0) | 75.0 ± 7.1 (70.0..80.0) | 50 |" in md
    assert "| 10 | 1 | 40 | 60 | 96 | 95.0 ± 0.0" in md
    assert "CPU X" in md and "2 cores" in md


def test_finetuned_checkpoint_carries_the_parents_stain_range_widened_by_the_new_lab(smoke_run: Path, ft_run: Path) -> None:
    """The exported fine-tuned model must not flag the new lab's stain, nor the parent's (cellcore.quality)."""
    from cellcore.quality import nucleus_hue, stain_hue_range
    from cellcore.imaging import decode
    from train.data import load_split_samples

    parent_train = load_split_samples(smoke_run / "split.json", "train")
    parent = stain_hue_range([Path(parent_train.root) / p for p in parent_train.paths])
    hue = load_checkpoint(ft_run / "best.pt")["stain_hue"]
    assert parent is not None and len(hue) == 4
    assert hue[0] <= parent[0] and hue[1] >= parent[1] and hue[2] <= parent[2] and hue[3] >= parent[3]
    shots = load_split_samples(ft_run / "split.json", "train")
    for p in shots.paths:
        r, b = nucleus_hue(decode(Path(shots.root) / p).rgb)
        assert hue[0] <= r <= hue[1] and hue[2] <= b <= hue[3], p


def test_finetune_at_another_input_size_exports_and_classifies_at_that_size(smoke_run: Path, new_lab: Path,
                                                                            tmp_path: Path) -> None:
    """--image-size: the checkpoint, the exported graph, the manifest and the app all take the new size."""
    import onnxruntime as ort

    from export.cli import main as export_main
    from mobile_app.classifier import CellClassifier

    run_dir = tmp_path / "ft96"
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(run_dir), "--shots", "2",
                 "--epochs", "1", "--image-size", "96"]) == 0
    ckpt = load_checkpoint(run_dir / "best.pt")
    parent = load_checkpoint(smoke_run / "best.pt")
    assert parent["preprocessing"]["input_size"] == 64
    assert ckpt["preprocessing"]["input_size"] == 96 and ckpt["config"]["image_size"] == 96
    assert export_main(["--run-dir", str(run_dir), "--formats", "onnx_fp32", "--calib-images", "8"]) == 0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["preprocessing"]["input_size"] == 96
    shape = ort.InferenceSession(str(run_dir / "export" / "mobilevit_xxs_onnx_fp32.onnx")).get_inputs()[0].shape
    assert list(shape[1:]) == [3, 96, 96]
    photo = next((new_lab / "neutrophil").iterdir())
    pred = CellClassifier(run_dir / "export", fmt="onnx").classify(photo)
    assert pred.label in ckpt["classes"] and len(pred.probabilities) == len(ckpt["classes"])


def test_finetune_refuses_a_too_small_input_size(smoke_run: Path, new_lab: Path, tmp_path: Path, caplog) -> None:
    rc = main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(tmp_path / "ft16"),
               "--shots", "2", "--epochs", "1", "--image-size", "16"])
    assert rc == 2 and "input_size must be at least 32, got 16" in caplog.text


def test_soup_is_the_average_of_its_ingredients(smoke_run: Path, ft_run: Path, new_lab: Path, tmp_path: Path) -> None:
    """average_weights on two real checkpoints, and a --soup 2 run that loads and predicts like any run."""
    from train.finetune import average_weights

    a = load_checkpoint(ft_run / "best.pt")["model"]
    b = {k: v * 3 if v.is_floating_point() else v for k, v in a.items()}
    avg = average_weights([a, b])
    assert set(avg) == set(a)
    for k, v in a.items():
        assert torch.allclose(avg[k], v * 2) if v.is_floating_point() else torch.equal(avg[k], v), k
    run_dir = tmp_path / "soup"
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--shots", "2", "--epochs", "1",
                 "--run-dir", str(run_dir), "--soup", "2"]) == 0
    ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["finetune"]["soup"] == 2
    model, prep, _ = model_from_checkpoint(ckpt, run_dir / "best.pt")
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, prep.input_size, prep.input_size))).all()


@pytest.mark.parametrize("mode", ["selftrain", "rehearse"])
def test_finetune_extras_compares_with_the_plain_finetune(mode: str, smoke_run: Path, new_lab: Path, tmp_path: Path,
                                                         caplog) -> None:
    """benchmarks.finetune_extras runs each idea beside the plain fine-tune on real photos; unknown classes refused."""
    from benchmarks.finetune_extras import main as extras_main

    import re

    known = tmp_path / "known"  # the new lab without its class the checkpoint does not know
    known.mkdir()
    for name in ("neutrophil", "lymphocyte", "monocyte"):
        os.symlink(new_lab / name, known / name)
    caplog.set_level("INFO")
    assert extras_main(["--from", str(smoke_run), "--data", str(known), "--mode", mode, "--shots", "2",
                        "--seeds", "0", "--threshold", "0.0", "--per-class", "2", "--epochs", "1"]) == 0
    assert "seed 0: plain fine-tune" in caplog.text and f"% ± 0.0, {mode} " in caplog.text
    if mode == "selftrain":  # threshold 0: every unlabelled photo of the other half is kept
        assert re.search(r"half 0: (\d+) of \1 unlabelled kept", caplog.text), caplog.text
    assert extras_main(["--from", str(smoke_run), "--data", str(new_lab), "--mode", mode]) == 2
    assert "classes the checkpoint does not know (newcell)" in caplog.text


def test_finetune_reports_the_held_out_accuracy_on_a_panel(smoke_run: Path, new_lab: Path, tmp_path: Path,
                                                           caplog) -> None:
    """--panel: the app's answer on a lab's panel (every held-out label is on it here, so it can only be as
    right or more right than the model's own answer); a panel naming an unknown class exits 2 naming it."""
    from benchmarks.finetune_kshot import format_markdown, summarise

    panel = "lymphocyte,monocyte,neutrophil,newcell"
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(tmp_path / "p"), "--shots", "2",
                 "--epochs", "1", "--panel", panel]) == 0
    result = json.loads((tmp_path / "p" / "finetune.json").read_text())
    assert result["panel"] == panel and result["held_out_accuracy_panel"] >= result["held_out_accuracy"]
    rows = summarise([{**result, "wall_s": 1.0}])
    assert rows[0]["panel_accuracy_mean"] == result["held_out_accuracy_panel"]
    md = format_markdown({"from": "r", "data": "d", "command": "c", "epochs": 1, "threads": 0, "summary": rows,
                          "panel": panel, "load_average": {"before": 0.0, "after": 0.0},
                          "machine": {"cpu_model": "CPU X", "processor": "", "cpu_count": 2, "usable_cores": 2,
                                      "system": "Linux", "python": "3"}})
    assert f"accuracy on the {panel} panel" in md and f"{100 * result['held_out_accuracy_panel']:.1f} ± 0.0" in md
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(tmp_path / "q"), "--shots", "2",
                 "--epochs", "1", "--panel", "lymphocyte,blast"]) == 2
    assert "blast" in caplog.text and not (tmp_path / "q" / "best.pt").exists()


def test_head_epochs_train_the_classifier_layer_alone_first(smoke_run: Path, new_lab: Path, tmp_path: Path,
                                                           caplog) -> None:
    """LP-FT: the head phase moves the classifier layer and nothing else (weights and BatchNorm statistics), on
    real cells; then the whole network trains, and the run records it. Bad values exit 2 before any training."""
    import numpy as np

    from train.data import load_rgb
    from train.finetune import FinetuneConfig, train_steps

    caplog.set_level("INFO", logger="train")  # whatever level an earlier test left the logger at
    model, prep, classes = model_from_checkpoint(load_checkpoint(smoke_run / "best.pt"))
    files = [f for c in ("neutrophil", "lymphocyte") for f in sorted((new_lab / c).iterdir())]
    x = torch.from_numpy(np.stack([np.asarray(prep.apply(load_rgb(f))) for f in files])).permute(0, 3, 1, 2)
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.startswith("head.fc.")}
    assert head == {"backbone.head.fc.weight", "backbone.head.fc.bias"}
    train_steps(model, x.contiguous(), y, None, torch.ones(len(y)), None, 0.0,
                FinetuneConfig(head_epochs=2, batch_size=4), seed=0, head_only=True)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == head, moved  # BatchNorm running statistics included: the network ran in eval mode
    assert all(p.requires_grad for p in model.parameters())  # the next phase trains everything
    run_dir = tmp_path / "lpft"
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(run_dir), "--shots", "2",
                 "--epochs", "1", "--head-epochs", "1"]) == 0
    assert load_checkpoint(run_dir / "best.pt")["finetune"]["head_epochs"] == 1
    assert "finetune head epoch 1/1" in caplog.text and "finetune epoch 1/1" in caplog.text
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(tmp_path / "bad"),
                 "--head-epochs", "-1"]) == 2
    assert "--head-epochs -1" in caplog.text and not (tmp_path / "bad").exists()


def test_kshot_benchmark_passes_the_input_size_and_reuses_only_a_matching_run(smoke_run: Path, new_lab: Path,
                                                                             tmp_path: Path) -> None:
    """`benchmarks.finetune_kshot --image-size`: the child fine-tune runs at that size, a second call reuses it,
    and a call with the default size does not (it replaces the run); a plain run is not reused for LP-FT."""
    from benchmarks.finetune_kshot import completed, run_finetune, run_settings

    def size() -> int:
        ckpt = load_checkpoint(run / "best.pt")
        return model_from_checkpoint(ckpt, run / "best.pt")[1].input_size

    parent = model_from_checkpoint(load_checkpoint(smoke_run / "best.pt"), smoke_run / "best.pt")[1].input_size
    run = tmp_path / "k2_s0"
    assert not run_finetune(str(smoke_run), str(new_lab), run, SHOTS, 0, epochs=1, image_size=80)["reused"]
    assert size() == 80 != parent
    assert run_finetune(str(smoke_run), str(new_lab), run, SHOTS, 0, epochs=1, image_size=80)["reused"]
    assert not run_finetune(str(smoke_run), str(new_lab), run, SHOTS, 0, epochs=1)["reused"]
    assert size() == parent  # the default: SHOTS per class are too few to upsize
    plain = run_settings(str(smoke_run), str(new_lab), SHOTS, 0, 1)
    assert completed(run, plain) is not None and completed(run, {**plain, "head_epochs": 20}) is None  # nor LP-FT


@pytest.mark.parametrize("flags,expected", [
    ([], "parent"),  # 2 shots per class: fewer than the default 10 the larger input needs
    (["--upsize-min-per-class", "2"], "at least 96"),
    (["--upsize-min-per-class", "3"], "parent"),  # the median class has 2 (monocyte has only 1)
    (["--upsize-min-per-class", "2", "--min-image-size", "0"], "parent"),
    (["--image-size", "72"], 72)])
def test_finetune_input_size_is_the_parents_but_at_least_96_px_with_enough_cells(flags: list[str], expected,
                                                                               smoke_run: Path, new_lab: Path,
                                                                               tmp_path: Path) -> None:
    """A small-input parent is fine-tuned at 96 px (its own size if larger) once the median class has
    --upsize-min-per-class training images, at its own size with fewer; --min-image-size 0 always keeps the
    parent's size and an explicit --image-size wins. The exported size is the checkpoint's."""
    parent = model_from_checkpoint(load_checkpoint(smoke_run / "best.pt"), smoke_run / "best.pt")[1].input_size
    run = tmp_path / "r"
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(run), "--shots", "2",
                 "--epochs", "1", *flags]) == 0
    size = model_from_checkpoint(load_checkpoint(run / "best.pt"), run / "best.pt")[1].input_size
    want = {"at least 96": max(parent, 96), "parent": parent}.get(expected, expected)
    assert size == want and (expected == "parent") == (size == parent)
    result = json.loads((run / "finetune.json").read_text())
    assert result["image_size"] == size and result["median_train_images_per_class"] == 2


def test_mixup_in_finetuning_trains_on_blends_and_is_recorded(smoke_run: Path, new_lab: Path, tmp_path: Path,
                                                             caplog) -> None:
    """--mixup: the same shots and seed give another model (the blends are what it fits), the run records the
    setting, the kshot benchmark reuses only a run made with it, and a negative alpha exits 2 before training."""
    from benchmarks.finetune_kshot import completed, run_settings

    runs = {}
    for alpha in (0.0, 0.4):
        run_dir = runs[alpha] = tmp_path / f"mix{alpha}"
        assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(run_dir), "--shots", "2",
                     "--epochs", "2", "--mixup", str(alpha)]) == 0
    plain, mixed = (load_checkpoint(runs[a] / "best.pt") for a in (0.0, 0.4))
    assert mixed["finetune"]["mixup"] == 0.4 and plain["finetune"]["mixup"] == 0.0
    assert not torch.equal(plain["model"]["backbone.head.fc.weight"], mixed["model"]["backbone.head.fc.weight"])
    kw = dict(from_run=str(smoke_run), data=str(new_lab), shots=2, seed=0, epochs=2)
    assert completed(runs[0.4], run_settings(**kw, mixup=0.4)) is not None
    assert completed(runs[0.4], run_settings(**kw)) is None
    assert main(["--from", str(smoke_run), "--data", str(new_lab), "--run-dir", str(tmp_path / "bad"),
                 "--mixup", "-1"]) == 2
    assert "--mixup -1" in caplog.text and not (tmp_path / "bad").exists()
