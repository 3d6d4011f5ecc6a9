"""The shipped model: `classify` and `run` without --model-dir use mobile_app/assets/model/ (or $CELLVIT_MODEL_DIR),
a given --model-dir wins, a missing bundle says how to get one, and `make app` picks the bundle unless RUN is given.
The bundle here is the tiny hand-built ONNX export (tests/fixtures_app/tiny_export.py): nothing trains."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mobile_app import cli
from tests.fixtures_app.tiny_export import CLASSES, photo, tiny_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return tiny_export(tmp_path / "assets" / "model")


@pytest.fixture
def cell(tmp_path: Path) -> Path:
    return photo(tmp_path / "cell.jpg")


@pytest.mark.parametrize("how", ["assets folder", "CELLVIT_MODEL_DIR"])
def test_classify_without_model_dir_uses_the_default_bundle(how: str, bundle: Path, cell: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    if how == "assets folder":
        monkeypatch.delenv("CELLVIT_MODEL_DIR", raising=False)
        monkeypatch.setattr(cli, "ASSETS_MODEL_DIR", bundle)
    else:
        monkeypatch.setattr(cli, "ASSETS_MODEL_DIR", tmp_path / "nothing here")
        monkeypatch.setenv("CELLVIT_MODEL_DIR", str(bundle))
    assert cli.main(["classify", "--json", str(cell)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_file"] == "tiny.onnx" and out["label"] in CLASSES


def test_a_given_model_dir_wins_over_the_default(bundle: Path, cell: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "tiny.onnx").write_bytes(b"not the model the manifest lists")
    monkeypatch.setattr(cli, "ASSETS_MODEL_DIR", broken)
    monkeypatch.setenv("CELLVIT_MODEL_DIR", str(broken))
    assert cli.main(["classify", str(cell)]) == 2  # the default is used, and refused...
    assert "does not match" in capsys.readouterr().err
    assert cli.main(["classify", "--model-dir", str(bundle), str(cell)]) == 0  # ...unless a folder is given


@pytest.mark.parametrize("command", [["classify", "IMAGE"], ["run"], []], ids=["classify", "run", "no command"])
@pytest.mark.parametrize("env", [False, True], ids=["bundle", "CELLVIT_MODEL_DIR"])
def test_a_missing_bundle_says_how_to_get_a_model(command: list[str], env: bool, cell: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "assets" / "model"
    monkeypatch.setattr(cli, "ASSETS_MODEL_DIR", missing)
    if env:
        monkeypatch.setenv("CELLVIT_MODEL_DIR", str(missing))
    else:
        monkeypatch.delenv("CELLVIT_MODEL_DIR", raising=False)
    # `run` must answer before any window opens: nothing here imports Kivy
    assert cli.main([str(cell) if a == "IMAGE" else a for a in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model:") and str(missing) in err
    assert ("$CELLVIT_MODEL_DIR" in err) == env
    assert "--model-dir runs/NAME/export" in err and "make app RUN=NAME" in err and "mobile_app bundle" in err
    assert "make release-model" in err


@pytest.mark.parametrize("args,expected", [
    ([], "-m mobile_app run"),  # no RUN: the shipped bundle
    (["RUN="], "-m mobile_app run"),
    (["RUN=mycells"], "-m mobile_app run --model-dir runs/mycells/export"),
])
def test_make_app_opens_the_bundle_unless_a_run_is_given(args: list[str], expected: str) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "app", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    (line,) = [ln for ln in out.splitlines() if "mobile_app run" in ln]
    assert line.split("python", 1)[1].strip() == expected


@pytest.mark.parametrize("target,expected", [
    ("export", "--run-dir runs/default"), ("app-assets", "--model-dir runs/default/export"),
    ("bench", "--run default"),
])
def test_other_targets_still_default_to_runs_default(target: str, expected: str) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert expected in out
