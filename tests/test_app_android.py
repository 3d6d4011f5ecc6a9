"""Android paths that fail first, checked with fakes: the ONNX Runtime execution provider, Java classes
resolved at start-up, the pinned runtime versions that `bundle` enforces, and (in a child process,
tests/android_app_cases.py) the real Kivy app: no autoclass off the main thread, run-time permissions,
Java exceptions in platform handlers.

The fake pyjnius (tests/fixtures_app/fake_jnius.py) computes with the desktop onnxruntime. Nothing
trains: the model is a tiny hand-built ONNX graph. Nothing here ran on a phone.
"""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_app.fake_jnius import FakeJVM
from tests.fixtures_app.tiny_export import fake_pte, photo, tiny_export, tiny_onnx
from mobile_app import android_versions as av
from mobile_app import cli, runtimes
from mobile_app.classifier import CellClassifier

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return tiny_export(tmp_path / "export")


@pytest.fixture
def cell(tmp_path: Path) -> Path:
    return photo(tmp_path / "cell.jpg")


# ----------------------------------------------------------------------------- the ONNX Runtime provider

@pytest.mark.parametrize("env,failing,provider,session_providers", [
    (None, (), "xnnpack", ["xnnpack"]),  # default: XNNPACK
    ("cpu", (), "cpu", []),
    ("nnapi", (), "nnapi", ["nnapi"]),  # opt-in only
    ("bogus", (), "xnnpack", ["xnnpack"]),  # an unknown choice is not an error
    (None, ("xnnpack",), "cpu", []),  # an AAR without XNNPACK: plain CPU, not a failure
    ("nnapi", ("nnapi",), "cpu", []),
])
def test_ort_android_provider_is_chosen_and_recorded(env: str | None, failing: tuple[str, ...], provider: str,
                                                     session_providers: list[str], export: Path, cell: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv(runtimes.ORT_PROVIDER_ENV, raising=False)
    else:
        monkeypatch.setenv(runtimes.ORT_PROVIDER_ENV, env)
    jvm = FakeJVM(failing_providers=failing)
    clf = CellClassifier(export, fmt="onnx", platform="android", bridge=runtimes.resolve_java_classes(jvm.bridge()))
    runtime = clf.load()
    assert runtime.provider == provider
    assert jvm.sessions[-1].providers == session_providers
    desktop = CellClassifier(export, fmt="onnx", platform="desktop").classify(cell)
    np.testing.assert_allclose(clf.classify(cell).probabilities, desktop.probabilities, atol=1e-6)
    clf.close()
    # every SessionOptions made is closed: the one that failed at once, the used one after its session
    assert jvm.closed.count("SessionOptions") == jvm.calls.count("SessionOptions.<init>")
    assert jvm.closed.index("OrtSession") < len(jvm.closed) - 1 - jvm.closed[::-1].index("SessionOptions")


def test_classify_json_names_the_provider(export: Path, cell: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    assert cli.main(["classify", "--json", "--model-dir", str(export), str(cell)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "onnxruntime" and out["provider"] == "cpu"


# ----------------------------------------------------------------------------- the app (in a child process)

def test_app_android_paths_in_a_child_process() -> None:
    """tests/android_app_cases.py: no autoclass off the main thread while the model loads and runs in the
    background, permissions per API level (granted -> picker, refused -> Settings message), a Java
    exception in each platform handler -> a message and a working app. A child process, because a Kivy
    window and a later torch._dynamo import in one process segfault (see that file)."""
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "android_app_cases.py"), "-q", "-p",
           "no:cacheprovider", "-o", "addopts=", "--timeout=600"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, summary
    assert re.search(r"\b(\d+) passed", proc.stdout) and " skipped" not in proc.stdout, summary


# ----------------------------------------------------------------------------- pinned runtime versions

def test_buildozer_gradle_pins_equal_the_python_constants() -> None:
    spec = configparser.ConfigParser(interpolation=None)
    spec.read(REPO / "mobile_app" / "buildozer.spec")
    pins = tuple(d.strip() for d in spec["app"]["android.gradle_dependencies"].split(","))
    assert pins == av.GRADLE_DEPENDENCIES


def test_the_exporters_pte_identifier_is_one_the_pinned_runtime_reads() -> None:
    spec = importlib.util.find_spec("executorch")  # located, not imported: importing it pulls in torch
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("executorch is not installed")
    fbs = Path(next(iter(spec.submodule_search_locations))) / "schema" / "program.fbs"
    (written,) = re.findall(rb'file_identifier\s+"([^"]{4})"', fbs.read_bytes())
    assert written in av.PTE_IDENTIFIERS


@pytest.mark.parametrize("identifier", [b"ET12", b"ET13", b"ET11"])
def test_pte_identifier_is_read_from_bytes_4_to_8(identifier: bytes, tmp_path: Path) -> None:
    assert av.pte_identifier(fake_pte(tmp_path / "m.pte", identifier)) == identifier


@pytest.mark.parametrize("ir_version,opset", [(7, 13), (8, 17), (10, 21), (13, 25), (14, 26)])
def test_minimal_onnx_reader_agrees_with_the_onnx_package(ir_version: int, opset: int, tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx", ir_version, opset)
    assert av.parse_onnx_versions(path.read_bytes()) == (ir_version, opset)
    assert av.onnx_versions(path) == (ir_version, opset)


@pytest.mark.parametrize("fmt,ir_version,opset,identifier,refused", [
    ("executorch", 8, 17, b"ET12", None),
    ("executorch", 8, 17, b"ET13", "identifier b'ET13'"),
    ("onnx", 8, 17, None, None),
    ("onnx", av.ORT_MAX_IR_VERSION, av.ORT_MAX_OPSET, None, None),
    ("onnx", av.ORT_MAX_IR_VERSION + 1, 17, None, f"IR version {av.ORT_MAX_IR_VERSION + 1}"),
    ("onnx", 8, av.ORT_MAX_OPSET + 1, None, f"opset {av.ORT_MAX_OPSET + 1}"),
])
@pytest.mark.parametrize("onnx_reader", ["onnx package", "minimal reader"])
def test_bundle_refuses_what_the_pinned_runtime_cannot_read(fmt: str, ir_version: int, opset: int,
                                                            identifier: bytes | None, refused: str | None,
                                                            onnx_reader: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    src = tiny_export(tmp_path / "export", ir_version, opset, pte_identifier=identifier)
    if onnx_reader == "minimal reader":
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError, as in the app's build
    dest = tmp_path / "assets"
    rc = cli.main(["bundle", "--model-dir", str(src), "--format", fmt, "--dest", str(dest), "--allow-unverified"])
    err = capsys.readouterr().err
    if refused is None:
        assert rc == 0, err
        assert len(list(dest.iterdir())) == 3  # the model file, manifest.json and MODEL_CARD.md
        return
    assert rc == 2
    name = "tiny_xnnpack_fp32.pte" if fmt == "executorch" else "tiny.onnx"
    runtime = av.GRADLE_DEPENDENCIES[1 if fmt == "executorch" else 0]
    assert name in err and refused in err and runtime in err, err  # the file, what it has, what reads it
    assert not dest.exists() or not any(dest.iterdir())  # nothing half-bundled


def test_resolving_reports_missing_classes_instead_of_failing() -> None:
    jvm = FakeJVM(missing=("org.pytorch.executorch.Module",), sdk_int=30)
    jc = runtimes.resolve_java_classes(jvm.bridge())
    assert jc.sdk_int == 30 and "org.pytorch.executorch.Module" in jc.missing
    assert set(jc.classes) == set(runtimes.ANDROID_JAVA_CLASSES) - {"org.pytorch.executorch.Module"}
    with pytest.raises(runtimes.JavaClassMissingError, match="ClassNotFoundException"):
        jc.get("org.pytorch.executorch.Module")


def test_every_java_member_the_fakes_offer_is_in_the_documented_api() -> None:
    """The app can only call what the fakes define (anything else is an AttributeError in the tests), so every
    public member of every fake Java class must exist in the real runtime as its source documents it."""
    from mobile_app.runtimes import ANDROID_JAVA_CLASSES
    from tests.fixtures_app.fake_jnius import FakeJVM
    from tests.fixtures_app.java_api import DOCUMENTED_JAVA_API, FAKE_ONLY

    bridge = FakeJVM().bridge()
    assert set(ANDROID_JAVA_CLASSES) <= set(DOCUMENTED_JAVA_API)  # the classes resolved at start-up exist
    for name in ANDROID_JAVA_CLASSES:
        offered = {a for a in dir(bridge.autoclass(name)) if not a.startswith("_")}
        invented = offered - DOCUMENTED_JAVA_API[name] - FAKE_ONLY.get(name, frozenset())
        assert not invented, f"{name}: {sorted(invented)} are not in the documented API"


def test_the_app_never_calls_a_fake_only_helper() -> None:
    import ast

    import mobile_app.runtimes as rt
    from tests.fixtures_app.java_api import FAKE_ONLY

    called = {n.attr for n in ast.walk(ast.parse(Path(rt.__file__).read_text())) if isinstance(n, ast.Attribute)}
    assert not called & set().union(*FAKE_ONLY.values())
