"""Panels (cellcore.panels): a lab's choice of classes, applied the same way by the rule, the app, the CLI,
verification and the benchmarks, on the shipped model and real photos of both labs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellcore.panels import PANELS, PanelError, resolve_panel
from cellcore.uncertainty import UncertaintyRule, rule_for, softmax
from mobile_app import cli
from mobile_app.classifier import CellClassifier

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "mobile_app" / "assets" / "model"
PBC = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


@pytest.mark.parametrize("spec, expected", [
    (None, None), ("", None), ("all", None),
    ("wbc5", (0, 1, 4, 5, 6)),
    ("wbc6", (0, 1, 3, 4, 5, 6)),
    ("neutrophil, lymphocyte", (4, 6)),
    (",".join(PBC), None),  # every class: no panel
])
def test_resolve_panel(spec: str | None, expected: tuple[int, ...] | None) -> None:
    assert resolve_panel(spec, PBC) == expected


@pytest.mark.parametrize("spec, classes, says", [
    ("wbc7", PBC, "wbc5, wbc6"),                       # unknown name: lists the panels and the classes
    ("blast,lymphocyte", PBC, "blast"),                # a class the model does not know is named
    ("lymphocyte", PBC, "at least two"),
    ("wbc5", ["lymphocyte", "neutrophil", "blast"], "basophil"),  # a model without the panel's classes
])
def test_resolve_panel_refuses_what_does_not_fit(spec: str, classes: list[str], says: str) -> None:
    with pytest.raises(PanelError, match=says):
        resolve_panel(spec, classes)


def test_rule_on_a_panel_masks_renormalises_and_flags_off_panel_first_answers() -> None:
    logits = np.array([[0.0, 0.0, 10.0, 0.0, 8.0, 0.0, 0.0, 0.0],  # erythroblast first, lymphocyte second
                       [0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0],    # lymphocyte, confident
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])   # platelet (not a white cell, off the panel)
    base = UncertaintyRule(temperature=2.0, threshold=0.8, not_a_cell=(7,), n_classes=8)
    rule = base.with_panel(resolve_panel("wbc5", PBC))
    probs = rule.probabilities(logits)
    on = list(PANELS["wbc5"])
    assert probs[:, [PBC.index(c) for c in PBC if c not in on]].max() == 0.0
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    all_probs = base.probabilities(logits)  # masking = renormalising the all-class probabilities over the panel
    idx = list(resolve_panel("wbc5", PBC))
    np.testing.assert_allclose(probs[:, idx], all_probs[:, idx] / all_probs[:, idx].sum(1, keepdims=True), atol=1e-6)
    assert [PBC[i] for i in probs.argmax(1)][:2] == ["lymphocyte", "lymphocyte"]
    assert rule.off_panel(logits).tolist() == [True, False, True] and base.off_panel(logits).tolist() == [False] * 3
    # the first picture's answer on the panel is confident, but the model's own first answer is off it: flagged
    _, flagged = rule.flagged_outputs(logits, [[], [], []])
    assert probs[0].max() > 0.8 and flagged.tolist() == [True, False, True]
    # Core ML gives probabilities: the same panel answer and flags
    p_in = softmax(logits)
    np.testing.assert_allclose(rule.probabilities(p_in, "probabilities"), probs, atol=1e-5)


def _answered_off_panel(crosslab: Path, n: int = 2) -> list[Path]:
    """The other lab's lymphocytes that the shipped model answers, over all its classes, with a class off wbc5."""
    clf = CellClassifier(BUNDLE, platform="desktop")
    found = [p for p in sorted((crosslab / "lymphocyte").iterdir())[:30]
             if clf.classify(p).label not in PANELS["wbc5"]]
    assert len(found) >= n, "the shipped model answers the other lab's lymphocytes on the panel: pick other photos"
    return found[:n]


@pytest.fixture(scope="module")
def crosslab(pbc_dev: Path) -> Path:
    root = pbc_dev.parent / "crosslab_dev"
    if not (root / "lymphocyte").is_dir():
        pytest.fail(f"cross-lab data not found at {root}")
    return root


def test_app_and_cli_on_the_five_part_panel_with_the_shipped_model(pbc_dev: Path, crosslab: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """CellClassifier(panel=wbc5) on real photos of both labs: the all-class probabilities renormalised over the
    panel, the rule's flags (an off-panel first answer says so), and `classify --panel wbc5` prints the same."""
    photos = _answered_off_panel(crosslab) + sorted((crosslab / "neutrophil").iterdir())[:3] + \
        [sorted((pbc_dev / c).iterdir())[3] for c in ("lymphocyte", "monocyte", "erythroblast", "platelet")]
    every, five = CellClassifier(BUNDLE, platform="desktop"), CellClassifier(BUNDLE, platform="desktop", panel="wbc5")
    classes = every.manifest.classes
    idx = list(resolve_panel("wbc5", classes))
    for photo in photos:
        a, b = every.classify(photo), five.classify(photo)
        pa, pb = np.array(a.probabilities), np.array(b.probabilities)
        np.testing.assert_allclose(pb[idx], pa[idx] / pa[idx].sum(), atol=1e-5)
        assert b.label in PANELS["wbc5"] and b.label == classes[idx[int(pa[idx].argmax())]]
        off = a.label not in PANELS["wbc5"]
        assert off == any("not on the wbc5 panel" in pr for pr in b.problems), (photo, a.label, b.problems)
        assert b.uncertain == five.rule.uncertain(b.probability, b.problems), photo
        assert b.uncertain >= off  # an off-panel first answer is always flagged
    assert cli.main(["classify", "--json", "--panel", "wbc5", *map(str, photos[:2])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["label"] for x in lines] == [five.classify(p).label for p in photos[:2]]
    assert all(x["uncertain"] and "not on the wbc5 panel" in x["message"] for x in lines)


def test_classify_refuses_a_panel_the_model_cannot_take(pbc_dev: Path, capsys: pytest.CaptureFixture) -> None:
    photo = sorted((pbc_dev / "lymphocyte").iterdir())[0]
    assert cli.main(["classify", "--panel", "wbc9", str(photo)]) == 2
    err = capsys.readouterr().err
    assert "unknown panel 'wbc9'" in err and "wbc5" in err and "neutrophil" in err


def test_rule_for_applies_the_panel_to_every_file_of_a_manifest() -> None:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    for entry in manifest["artifacts"]:
        rule = rule_for(manifest, entry["file"], "wbc6")
        assert rule.panel == resolve_panel("wbc6", manifest["classes"]) and rule.threshold is not None
        assert rule_for(manifest, entry["file"]).panel is None



def _logits_file(run: Path, logits: list[list[float]], paths: list[str]) -> Path:
    """A train.evaluate --save-logits file for run/eval/test.npz; every picture is a lymphocyte."""
    path = run / "eval" / "test.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, logits=np.asarray(logits, np.float32), labels=np.full(len(logits), PBC.index("lymphocyte")),
             classes=np.asarray(PBC), paths=np.asarray(paths))
    return path


def _row(**logit: float) -> list[float]:
    return [logit.get(c, 0.0) for c in PBC]


def test_panel_logits_scores_runs_and_their_ensemble_and_refuses_other_pictures(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from benchmarks import panel_logits

    pics = ["a.jpg", "b.jpg", "c.jpg"]
    # run a is wrong on the third picture, run b on the second, each by less than the other is right by:
    # the mean of their logits gets all three right
    a = _logits_file(tmp_path / "run_a", [_row(lymphocyte=3), _row(lymphocyte=3), _row(erythroblast=1, lymphocyte=0.5)], pics)
    b = _logits_file(tmp_path / "run_b", [_row(lymphocyte=2), _row(erythroblast=1, lymphocyte=0.8), _row(lymphocyte=2)], pics)
    out = tmp_path / "table"
    assert panel_logits.main([str(a), str(b), "--ensemble", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert rows["run_a"]["accuracy"] == pytest.approx(2 / 3) and rows["run_b"]["accuracy"] == pytest.approx(2 / 3)
    assert rows["mean of run_a + run_b"]["accuracy"] == 1.0
    assert rows["run_a"]["accuracy_panel"] == 1.0  # erythroblast is off the wbc5 panel: the panel answer is right
    assert "| mean of run_a + run_b | 3 | 100.0% |" in out.with_suffix(".md").read_text()

    # a run with another seed has another split: its pictures differ, and averaging is refused, naming the file
    c = _logits_file(tmp_path / "run_c", [_row(lymphocyte=1)] * 3, ["a.jpg", "b.jpg", "x.jpg"])
    assert panel_logits.main([str(a), str(c), "--ensemble"]) == 2
    assert "run_c/eval/test.npz" in caplog.text and "cannot be averaged" in caplog.text
