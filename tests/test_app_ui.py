"""The real Kivy app under Xvfb, driven by a step script in a subprocess: classify, count, restart, bad model, and
picking cells in a field by touch."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_app import images as img
from tests.fixtures_app.exports import artifact_file, copy_export

pytestmark = pytest.mark.ui

REPO = Path(__file__).resolve().parent.parent
CROP_GREEN = (26, 242, 89)  # PhotoView's square, rgba (0.1, 0.95, 0.35)
BAR_TEAL = (51, 158, 148)  # ProbBar fill, C_ACCENT (0.20, 0.62, 0.58)


def display_prefix() -> list[str]:
    if shutil.which("xvfb-run"):
        return ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]
    if os.environ.get("DISPLAY"):
        return []
    if os.environ.get("CI"):
        pytest.fail("UI tests need Xvfb: apt-get install -y xvfb")
    pytest.skip("no X display and no xvfb-run (apt-get install -y xvfb)")


def run_app(model_dir: Path | None, steps: list[dict], work: Path, data_dir: Path, name: str,
            env: dict[str, str] | None = None) -> dict:
    """Start `python -m mobile_app run` with a script; return its result JSON (fails with the app's log).

    model_dir None: no --model-dir, so the app opens its default model ($CELLVIT_MODEL_DIR, via `env`)."""
    script, result = work / f"{name}_steps.json", work / f"{name}_result.json"
    script.write_text(json.dumps(steps))
    env = {**os.environ, "CELLVIT_DATA_DIR": str(data_dir), "KIVY_HOME": str(work / "kivy_home"),
           "KIVY_NO_ARGS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [*display_prefix(), sys.executable, "-m", "mobile_app", "run",
           *(["--model-dir", str(model_dir)] if model_dir is not None else []),
           "--script", str(script), "--result", str(result)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert result.exists(), f"no result from the app (rc {proc.returncode}):\n{log}"
    outcome = json.loads(result.read_text())
    assert outcome["ok"], f"{outcome['error']}\n{log}"
    assert proc.returncode == 0, log
    text = proc.stdout + proc.stderr  # Kivy logs an import traceback for the optional mtdev input provider
    blocks = text.split("Traceback")[1:]
    assert all("mtdev" in b[:400] for b in blocks), text[-6000:]
    assert "unexpected error" not in text, text[-6000:]
    return outcome


def colour_share(png: Path, rgb: tuple[int, int, int], tol: int = 12) -> float:
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return float((np.abs(a - np.array(rgb)).max(axis=2) <= tol).mean())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui")


def test_classify_one_photo(smoke_export: Path, pbc_dev: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    photo = img.real_images(pbc_dev, per_class=1)[6]  # a neutrophil
    shot = work / "classify.png"
    out = run_app(smoke_export, [
        {"do": "wait_model"}, {"do": "open", "path": str(photo)}, {"do": "wait_idle"},
        {"do": "record", "name": "shown"}, {"do": "screenshot", "path": str(shot)},
        {"do": "screen", "name": "about"}, {"do": "screenshot", "path": str(work / "about.png")},
        {"do": "record", "name": "about"},
    ], work, work / "data1", "classify")
    shown = out["records"]["shown"]

    from mobile_app import cli  # the headless command must say the same thing about the same photo

    assert cli.main(["classify", "--json", "--model-dir", str(smoke_export), str(photo)]) == 0
    headless = json.loads(capsys.readouterr().out)
    assert shown["model_state"] == "ready" and shown["photo"] == photo.name
    assert shown["label"] == headless["label"]
    assert shown["probability"] == pytest.approx(headless["probability"], abs=1e-5)
    assert [c for c, _ in shown["top"]] == [c for c, _ in headless["top"]] and len(shown["top"]) == 3
    assert shown["uncertain"] == headless["uncertain"]
    assert shown["message"] == ("uncertain — review by a hematologist" if headless["uncertain"] else "")
    assert "inference" in shown["info"] and " ms" in shown["info"]
    assert shown["crop"] == pytest.approx([0, 1 / 363, 1, 361 / 363], abs=1e-3)  # 360x363: centred square
    about = out["records"]["about"]["about"]
    assert "Classes (8)" in about and "research use only" in about.lower() and "Training data" in about
    print(f"\nUI timing (s since launch): {out['final']['timing']}; screenshots: {out['screenshots']}")

    size = Image.open(shot).size
    assert size[0] >= 500 and size[1] >= 800, size
    assert colour_share(shot, CROP_GREEN) > 0.002, "the classified square is not drawn"
    assert colour_share(shot, BAR_TEAL) > 0.001, "no probability bars visible"


def test_differential_count_survives_restart_and_bad_model(smoke_export: Path, pbc_dev: Path, work: Path,
                                                           tmp_path: Path) -> None:
    photos = img.real_images(pbc_dev, per_class=1)[:3]
    folder = tmp_path / "slide"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    img.truncated_copy(photos[0], folder / "zz_cut.jpg")  # fails with a message, is not counted
    (folder / "notes.txt").write_text("not an image: the chooser and the folder scan skip it")
    data = tmp_path / "data"
    first = run_app(smoke_export, [  # driven through the real widgets, as a user would
        {"do": "wait_model"}, {"do": "screen", "name": "count"},
        {"do": "tap", "text": "Add photos"}, {"do": "chooser", "path": str(folder)},
        {"do": "tap", "text": "Count selection / this folder"}, {"do": "wait_idle"},
        {"do": "record", "name": "added"},
        {"do": "tap", "prefix": "#1 "}, {"do": "tap", "text": "monocyte"},  # correction popup
        {"do": "tap", "text": "New count"}, {"do": "tap", "text": "Cancel"},  # confirmation declined
        {"do": "screenshot", "path": str(work / "count.png")},
        {"do": "tap", "text": "Export CSV"}, {"do": "record", "name": "counted"},
    ], work, data, "count")
    added, counted = first["records"]["added"], first["records"]["counted"]
    assert "zz_cut.jpg" in added["status"] and "truncated" in added["status"]
    assert counted["count_total"] == 3 and [e["file"] for e in counted["entries"]] == \
        [str(folder / p.name) for p in photos]
    e0 = counted["entries"][0]
    assert e0["label"] == "monocyte" and e0["corrected"] == (e0["predicted"] != "monocyte")
    assert sum(counted["counts"].values()) == 3 and counted["counts"]["monocyte"] >= 1

    (csv_path,) = [p for p in (data / "exports").glob("*.csv") if not p.stem.endswith("_tally")]
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["file"] for r in rows] == [e["file"] for e in counted["entries"]] and rows[0]["label"] == "monocyte"
    tally = {r["class"]: r for r in csv.DictReader(csv_path.with_name(f"{csv_path.stem}_tally.csv").open())}
    assert tally["total"]["count"] == "3"
    assert {k: int(v["count"]) for k, v in tally.items() if k != "total"} == counted["counts"]

    # restart with a damaged model file: the app must open, say why it cannot classify, and keep the count
    broken = copy_export(smoke_export, tmp_path / "broken", [artifact_file(smoke_export, "onnx")])
    onnx = artifact_file(broken, "onnx")
    onnx.write_bytes(onnx.read_bytes()[:-100] + b"\0" * 100)
    second = run_app(broken, [
        {"do": "wait_model"}, {"do": "open", "path": str(photos[1])}, {"do": "wait_idle"},
        {"do": "screen", "name": "count"}, {"do": "screenshot", "path": str(work / "restart.png")},
        {"do": "record", "name": "restarted"},
    ], work, data, "restart")
    state = second["records"]["restarted"]
    assert state["model_state"] == "error" and state["status_level"] == "error"
    assert state["status"].startswith(f"Cannot classify {photos[1].name}. Model problem:")
    assert "does not match the manifest" in state["status"] and "does not match" in state["model_error"]
    assert state["count_total"] == 3 and state["entries"] == counted["entries"]  # never lost
    assert json.loads((data / "differential_count.json").read_text())["entries"][0]["label"] == "monocyte"


# ----------------------------------------------------------------------------- picking cells in a field

PICK_CYAN = (38, 204, 255)  # PhotoView's picked square, C_PICK (0.15, 0.80, 1.0)


def outline_share(png: Path, rect: list[float], rgb: tuple[int, int, int], outset: float, tol: int = 40) -> float:
    """Share of the points along a rectangle's outline (window pixels, top-left origin, `outset` outside it)
    that have this colour: 1.0 when the square is drawn exactly there."""
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    l, t, r, b = rect[0] - outset, rect[1] - outset, rect[2] + outset, rect[3] + outset
    pts = [(x, y) for x in np.linspace(l + 4, r - 4, 40) for y in (t, b)] + \
          [(x, y) for y in np.linspace(t + 4, b - 4, 40) for x in (l, r)]
    hits = 0
    for x, y in pts:  # the 1.5 px line may fall either side of a rounded coordinate
        patch = a[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2]
        hits += bool((np.abs(patch - np.array(rgb)).max(axis=2) <= tol).any())
    return hits / len(pts)


def colour_inside(png: Path, region: list[float], rect: list[float], rgb: tuple[int, int, int], margin: float,
                  tol: int = 40) -> tuple[int, float]:
    """(how many pixels of `region` have this colour, the share of them within `rect` grown by `margin`)."""
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    ys, xs = np.nonzero(np.abs(a - np.array(rgb)).max(axis=2) <= tol)
    keep = (xs >= region[0]) & (xs < region[2]) & (ys >= region[1]) & (ys < region[3])
    xs, ys = xs[keep], ys[keep]
    inside = (xs >= rect[0] - margin) & (xs <= rect[2] + margin) & (ys >= rect[1] - margin) & (ys <= rect[3] + margin)
    return len(xs), float(inside.mean()) if len(xs) else 0.0


def test_pick_cells_in_a_field_by_touch(pbc_dev: Path, work: Path, tmp_path: Path) -> None:
    """A field of three real cells: a finger taps each, the (cyan) square goes to that cell with the size the
    headless `classify --box x,y` picks; the slider and a pinch size it, a drag moves it, and "Classify square"
    classifies exactly it; the count and its CSV keep the square. The app opens the default model (no
    --model-dir; $CELLVIT_MODEL_DIR points at a tiny bundle)."""
    from mobile_app.classifier import CellClassifier
    from mobile_app.tally import read_csv
    from tests.fixtures_app.tiny_export import tiny_export

    field, cells = img.cell_field(pbc_dev, tmp_path / "field.png")
    bundle = tiny_export(tmp_path / "bundle")
    taps = [(c.centre[0] + 30, c.centre[1] - 20) for c in cells]  # on the cell, off its centre
    steps: list[dict] = [{"do": "wait_model"}, {"do": "open", "path": str(field)}, {"do": "wait_idle"},
                         {"do": "record", "name": "opened"}]
    for cell, (x, y) in zip(cells, taps):
        steps += [{"do": "tap_photo", "x": x, "y": y}, {"do": "wait_idle"}, {"do": "record", "name": cell.cls},
                  {"do": "screenshot", "path": str(work / f"pick_{cell.cls}.png")}]
    x0, y0 = taps[0]
    steps += [
        {"do": "slide", "value": 300}, {"do": "record", "name": "slid"},
        {"do": "tap_photo", "x": x0, "y": y0}, {"do": "wait_idle"}, {"do": "record", "name": "retapped"},
        {"do": "pinch_photo", "x": x0, "y": y0, "factor": 1.5}, {"do": "record", "name": "pinched"},
        {"do": "drag_photo", "x": x0, "y": y0, "to": [x0 + 60, y0 + 40]}, {"do": "record", "name": "dragged"},
        {"do": "tap", "text": "Classify square"}, {"do": "wait_idle"}, {"do": "record", "name": "classified"},
        {"do": "screenshot", "path": str(work / "pick_classified.png")},
        {"do": "tap", "text": "Add to count"}, {"do": "export_csv", "path": str(tmp_path / "count.csv")},
        {"do": "record", "name": "counted"},
    ]
    out = run_app(None, steps, work, tmp_path / "data", "pick", env={"CELLVIT_MODEL_DIR": str(bundle)})
    rec = out["records"]
    assert rec["opened"]["model_state"] == "ready" and "tiny.onnx" in rec["opened"]["model_name"]
    assert rec["opened"]["photo_size"] == [1200, 900] and rec["opened"]["box"] == []

    headless = CellClassifier(bundle, fmt="onnx", platform="desktop")
    for cell, (x, y) in zip(cells, taps):
        state = rec[cell.cls]
        box = state["box"]
        assert box == pytest.approx(list(headless.suggest(field, x, y)))  # the UI and `classify --box x,y` agree
        assert abs(box[0] - cell.centre[0]) < 40 and abs(box[1] - cell.centre[1]) < 40  # on the tapped cell
        assert not state["box_locked"] and state["status_level"] == "info"
        # the square is drawn where the photo shows that cell: state's geometry, then the pixels themselves
        pl, pt, pr, pb = state["photo_on_screen"]
        k = (pr - pl) / 1200
        expected = [pl + (box[0] - box[2] / 2) * k, pt + (box[1] - box[2] / 2) * k,
                    pl + (box[0] + box[2] / 2) * k, pt + (box[1] + box[2] / 2) * k]
        assert state["box_on_screen"] == pytest.approx(expected, abs=1.5)
        shot = work / f"pick_{cell.cls}.png"
        assert outline_share(shot, state["box_on_screen"], PICK_CYAN, outset=3) > 0.9, cell.cls
        n, share = colour_inside(shot, state["photo_on_screen"], state["box_on_screen"], PICK_CYAN, margin=6)
        assert n > 100 and share > 0.98, (cell.cls, n, share)  # and nowhere else on the photo

    slid, retapped, pinched, dragged = rec["slid"], rec["retapped"], rec["pinched"], rec["dragged"]
    assert slid["box"][2] == pytest.approx(300, abs=1) and slid["box_locked"]
    assert slid["box"][:2] == pytest.approx(rec[cells[-1].cls]["box"][:2], abs=1)  # resized where it was
    assert retapped["box"][2] == slid["box"][2]  # the user's size stays for the next tap...
    assert retapped["box"][:2] == pytest.approx(rec[cells[0].cls]["box"][:2], abs=1)  # ...on the new cell
    assert pinched["box"][2] == pytest.approx(1.5 * retapped["box"][2], abs=2)  # two fingers spread 1.5x
    assert dragged["box"][2] == pinched["box"][2]
    assert [d - p for d, p in zip(dragged["box"][:2], pinched["box"][:2])] == pytest.approx([60, 40], abs=2)

    classified = rec["classified"]
    box = tuple(dragged["box"])
    assert classified["prediction_box"] == pytest.approx(list(box))
    expected_pred = headless.classify(field, box=box)
    assert classified["label"] == expected_pred.label
    assert classified["probability"] == pytest.approx(expected_pred.probability, abs=1e-5)
    assert classified["crop"] == pytest.approx([(box[0] - box[2] / 2) / 1200, (box[1] - box[2] / 2) / 900,
                                                (box[0] + box[2] / 2) / 1200, (box[1] + box[2] / 2) / 900], abs=1e-6)
    shot = work / "pick_classified.png"
    assert outline_share(shot, classified["box_on_screen"], PICK_CYAN, outset=3) > 0.9
    assert outline_share(shot, classified["crop_on_screen"], CROP_GREEN, outset=0) > 0.9  # the classified one

    counted = rec["counted"]
    assert counted["entries"][-1]["box"] == pytest.approx(list(box))
    (entry,) = read_csv(tmp_path / "count.csv")
    assert entry.box == pytest.approx(box, abs=0.05) and entry.file == str(field) and entry.label == expected_pred.label
    print(f"\nscreenshots: {[s for s in out['screenshots']]}")


def test_a_fresh_clone_opens_the_shipped_model_and_classifies_a_pbc_photo(pbc_dev: Path, work: Path,
                                                                         capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`make app` with no RUN: the committed bundle (mobile_app/assets/model), no training, no --model-dir."""
    from mobile_app import cli

    bundle = REPO / "mobile_app" / "assets" / "model"
    manifest = json.loads((bundle / "manifest.json").read_text())
    photo = img.real_images(pbc_dev, per_class=1)[4]  # a lymphocyte (100% test recall on the card)
    shot = work / "shipped.png"
    monkeypatch.delenv("CELLVIT_MODEL_DIR", raising=False)
    out = run_app(None, [
        {"do": "wait_model"}, {"do": "open", "path": str(photo)}, {"do": "wait_idle"},
        {"do": "record", "name": "shown"}, {"do": "screenshot", "path": str(shot)},
        {"do": "screen", "name": "about"}, {"do": "screenshot", "path": str(work / "shipped_about.png")},
        {"do": "record", "name": "about"},
    ], work, work / "data_shipped", "shipped")
    shown = out["records"]["shown"]
    shipped = [a["file"] for a in manifest["artifacts"] if (bundle / a["file"]).exists()]
    assert len(shipped) == 1 and shown["model_state"] == "ready" and shown["model_name"].startswith(shipped[0])
    assert shown["label"] == photo.parent.name == "lymphocyte"
    assert cli.main(["classify", "--json", str(photo)]) == 0  # headless, no --model-dir: the same bundle
    assert json.loads(capsys.readouterr().out)["label"] == shown["label"]
    about = out["records"]["about"]["about"]
    # every number names its data: the held-out test split with its size, and the other lab's folder
    src = manifest["metrics"]["verify_source"]
    assert f"the held-out test split, {src['images']} images" in about and "95% CI" in about
    assert "on crosslab_dev" in about
    # the uncertainty threshold of the file in use, with what it keeps on validation (met the target: no warning)
    rec = manifest["uncertainty"]["per_artifact"][shipped[0]]
    assert f"at or above it: validation accuracy {100 * rec['accuracy_at_or_above']:.1f} %" in about
    assert "under the" not in about
    assert colour_share(shot, CROP_GREEN) > 0.002, "the classified square is not drawn"


def test_a_lab_picks_the_five_part_panel_on_the_about_screen(pbc_dev: Path, work: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """About screen -> "5-part diff": the photo on screen is classified again on the panel, its off-panel first
    answer is said and flagged, the choice survives a restart, and "All classes" brings the model's own answer back."""
    from cellcore.panels import PANELS
    from mobile_app.classifier import CellClassifier

    bundle = REPO / "mobile_app" / "assets" / "model"
    clf = CellClassifier(bundle, platform="desktop")
    lymphocytes = sorted((pbc_dev.parent / "crosslab_dev" / "lymphocyte").iterdir())[:30]
    photo = next(p for p in lymphocytes if clf.classify(p).label not in PANELS["wbc5"])  # another lab's soft cell
    first = clf.classify(photo).label
    on_panel = CellClassifier(bundle, platform="desktop", panel="wbc5").classify(photo)
    monkeypatch.delenv("CELLVIT_MODEL_DIR", raising=False)
    data = work / "data_panel"
    out = run_app(None, [
        {"do": "wait_model"}, {"do": "open", "path": str(photo)}, {"do": "wait_idle"}, {"do": "record", "name": "all"},
        {"do": "screen", "name": "about"}, {"do": "tap", "text": "5-part diff"}, {"do": "wait_idle"},
        {"do": "record", "name": "five"}, {"do": "screenshot", "path": str(work / "panel_about.png")},
        {"do": "screen", "name": "classify"}, {"do": "screenshot", "path": str(work / "panel_classify.png")},
    ], work, data, "panel")
    before, after = out["records"]["all"], out["records"]["five"]
    assert before["panel"] == "all" and before["label"] == first
    assert after["panel"] == "wbc5" and after["label"] == on_panel.label in PANELS["wbc5"]
    assert after["uncertain"] and f"the model's first answer, {first}, is not on the wbc5 panel" in after["message"]
    assert abs(after["probability"] - on_panel.probability) < 1e-4
    assert "Panel[/b]: five-part differential" in after["about"] and "off the chosen panel" in after["about"]
    assert json.loads((data / "settings.json").read_text()) == {"panel": "wbc5"}
    again = run_app(None, [
        {"do": "wait_model"}, {"do": "record", "name": "restarted"},
        {"do": "screen", "name": "about"}, {"do": "tap", "text": "All classes"},
        {"do": "open", "path": str(photo)}, {"do": "wait_idle"}, {"do": "record", "name": "all"},
    ], work, data, "panel_again")
    assert again["records"]["restarted"]["panel"] == "wbc5"
    assert again["records"]["all"]["panel"] == "all" and again["records"]["all"]["label"] == first
    assert json.loads((data / "settings.json").read_text()) == {"panel": "all"}
