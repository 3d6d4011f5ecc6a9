"""The real Kivy app under Xvfb, driven by a step script in a subprocess: classify, count, restart, bad model."""
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


def run_app(model_dir: Path, steps: list[dict], work: Path, data_dir: Path, name: str) -> dict:
    """Start `python -m mobile_app run` with a script; return its result JSON (fails with the app's log)."""
    script, result = work / f"{name}_steps.json", work / f"{name}_result.json"
    script.write_text(json.dumps(steps))
    env = {**os.environ, "CELLVIT_DATA_DIR": str(data_dir), "KIVY_HOME": str(work / "kivy_home"),
           "KIVY_NO_ARGS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*display_prefix(), sys.executable, "-m", "mobile_app", "run", "--model-dir", str(model_dir),
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
