"""The real Kivy app on "android" with phone fakes; run by tests/test_app_android.py in a child process.

Not collected by the main test session (the name does not start with test_): a Kivy window (SDL2 +
Mesa's OpenGL) in a process that later imports torch._dynamo / triton crashes that process with a
segfault, and the training and export tests import both. So these cases always run in their own
interpreter: `python -m pytest tests/android_app_cases.py`.

The fakes stand in for pyjnius (tests/fixtures_app/fake_jnius.py), android.permissions,
android.storage and plyer; everything else is the app's own code. Nothing trains: the model is a tiny
hand-built ONNX graph. Nothing here ran on a phone.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from collections.abc import Callable

import pytest

os.environ.setdefault("KIVY_NO_ARGS", "1")  # before anything imports Kivy
os.environ.setdefault("KIVY_NO_FILELOG", "1")
os.environ.setdefault("KIVY_HOME", tempfile.mkdtemp(prefix="kivy-home-"))

from tests.fixtures_app.fake_jnius import FakeJVM, JavaException  # noqa: E402
from tests.fixtures_app.tiny_export import photo, tiny_export  # noqa: E402
from mobile_app import phone, runtimes  # noqa: E402

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return tiny_export(tmp_path / "export")


@pytest.fixture
def cell(tmp_path: Path) -> Path:
    return photo(tmp_path / "cell.jpg")


class FakePhone:
    """jnius, android.permissions, android.storage and plyer as a python-for-android build has them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp: Path, sdk_int: int = 34):
        self.jvm = FakeJVM(sdk_int=sdk_int)
        self.granted: set[str] = set()  # what check_permission says now
        self.answer = True  # what the user taps in the permission dialog
        self.requested: list[list[str]] = []
        self.opened: list[str] = []  # "gallery" / "camera" when plyer was asked to open them
        self.selection: list[str | None] = [str(tmp / "picked.jpg")]
        self.fail: dict[str, BaseException] = {}  # call name -> exception it raises
        self.storage = tmp / "sdcard"
        self.threads: list[threading.Thread] = []  # the fakes' callbacks from "Android's UI thread"
        fake = self

        jnius = ModuleType("jnius")
        jnius.autoclass, jnius.cast, jnius.JavaException = self.jvm.autoclass, self.jvm.cast, JavaException

        def check_permission(permission: str) -> bool:
            fake._maybe_fail("check_permission")
            return permission in fake.granted

        def request_permissions(permissions: list[str], callback: Callable[[list[str], list[bool]], None]) -> None:
            fake._maybe_fail("request_permissions")
            fake.requested.append(list(permissions))
            if fake.answer:
                fake.granted |= set(permissions)
            # Android answers later, on its UI thread, not on the Kivy thread that asked
            fake._later(callback, list(permissions), [fake.answer] * len(permissions))

        permissions = ModuleType("android.permissions")
        permissions.check_permission, permissions.request_permissions = check_permission, request_permissions
        permissions.Permission = SimpleNamespace(CAMERA=phone.CAMERA, READ_MEDIA_IMAGES=phone.READ_MEDIA_IMAGES,
                                                 READ_EXTERNAL_STORAGE=phone.READ_EXTERNAL_STORAGE)

        def primary_external_storage_path() -> str:
            fake._maybe_fail("primary_external_storage_path")
            return str(fake.storage)

        storage = ModuleType("android.storage")
        storage.primary_external_storage_path = primary_external_storage_path

        def open_file(on_selection: Callable[[list[str | None]], None], multiple: bool = False,
                      filters: Any = None) -> None:
            fake._maybe_fail("open_file")
            fake.opened.append("gallery")
            fake._later(on_selection, list(fake.selection))

        def take_picture(filename: str, on_complete: Callable[[str], bool]) -> None:
            fake._maybe_fail("take_picture")
            fake.opened.append("camera")

        plyer = ModuleType("plyer")
        plyer.filechooser = SimpleNamespace(open_file=open_file)
        plyer.camera = SimpleNamespace(take_picture=take_picture)
        android = ModuleType("android")
        android.__path__ = []  # a package
        for name, module in {"jnius": jnius, "android": android, "android.permissions": permissions,
                             "android.storage": storage, "plyer": plyer}.items():
            monkeypatch.setitem(sys.modules, name, module)

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name="android-ui")
        self.threads.append(t)
        t.start()

    def settle(self, app: Any) -> None:
        """Let every callback arrive and every job finish, so nothing reaches the next test's app."""
        from kivy.clock import Clock

        for t in self.threads:
            t.join(10)
        for _ in range(3):
            Clock.tick()
        pump(lambda: not app.pending)

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]


def pump(until: Callable[[], bool], timeout: float = 60.0) -> None:
    """Run Kivy's clock (as the app's main loop would) until `until()` holds."""
    from kivy.clock import Clock

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        Clock.tick()
        if until():
            return
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the app")


@pytest.fixture
def android_app(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """The real CellClassifierApp on "android" with the fakes, started as Kivy starts it (model loads in the
    background); yields (app, fake phone)."""
    monkeypatch.delenv(runtimes.ORT_PROVIDER_ENV, raising=False)
    sdk_int = getattr(request, "param", 34)
    fake = FakePhone(monkeypatch, tmp_path, sdk_int=sdk_int)
    try:
        from mobile_app import ui
    except Exception as exc:  # noqa: BLE001 - no window provider (no display) on this machine
        pytest.skip(f"Kivy cannot open a window here: {exc}")
    monkeypatch.setattr(ui, "detect_platform", lambda: "android")
    app = ui.CellClassifierApp(model_dir=export, data_dir=tmp_path / "data")
    app.on_start()
    pump(lambda: app.model_state != "loading" and not app.pending)
    yield app, fake
    fake.settle(app)
    app.on_stop()


def test_model_loads_and_runs_in_background_without_autoclass_off_the_main_thread(android_app, cell: Path) -> None:
    app, fake = android_app
    assert app.model_state == "ready", app.model_error
    assert threading.current_thread() is threading.main_thread()
    (session,) = fake.jvm.sessions
    assert session.thread is not threading.main_thread()  # loaded on the worker, as on the phone
    app.open_photo(cell)
    pump(lambda: not app.pending)
    state = app.state()
    assert state["label"] and state["provider"] == "xnnpack", state
    assert "onnxruntime-android (xnnpack)" in state["info"] and " ms" in state["info"]
    assert "xnnpack" in state["model_name"]
    # the model was loaded and run on the worker thread, yet every class lookup happened on the main thread
    assert fake.jvm.autoclass_threads, "the app never looked up a Java class"
    assert fake.jvm.off_main_thread() == []
    assert app.java is not None and app.java.sdk_int == 34


@pytest.mark.parametrize("android_app,action,expected_permission,opened", [
    (34, "choose_photo", phone.READ_MEDIA_IMAGES, "gallery"),
    (33, "choose_for_count", phone.READ_MEDIA_IMAGES, "gallery"),
    (32, "choose_photo", phone.READ_EXTERNAL_STORAGE, "gallery"),  # before Android 13
    (34, "take_photo", phone.CAMERA, "camera"),
], indirect=["android_app"])
@pytest.mark.parametrize("answer", [True, False])
def test_permission_is_asked_before_the_picker(android_app, action: str, expected_permission: str, opened: str,
                                              answer: bool) -> None:
    app, fake = android_app
    fake.answer = answer
    getattr(app, action)()
    pump(lambda: bool(fake.opened) or "Permission refused" in app.status)
    assert fake.requested == [[expected_permission]]
    if answer:
        assert fake.opened == [opened]
    else:
        assert fake.opened == []
        assert app.status_level == "warning"
        assert "Settings > Apps > Cell classifier > Permissions" in app.status


def test_granted_permission_is_not_asked_again(android_app) -> None:
    app, fake = android_app
    fake.granted = {phone.READ_MEDIA_IMAGES}
    app.choose_photo()
    assert fake.opened == ["gallery"] and fake.requested == []  # no dialog, straight to the gallery


@pytest.mark.parametrize("action,failing_call,message", [
    ("choose_photo", "open_file", "Gallery unavailable"),
    ("choose_for_count", "open_file", "Gallery unavailable"),
    ("take_photo", "take_picture", "Camera unavailable"),
    ("choose_photo", "request_permissions", "Could not ask for permission"),
    ("take_photo", "check_permission", "Could not ask for permission"),
])
def test_java_exception_in_a_platform_handler_ends_in_a_message(android_app, cell: Path, action: str,
                                                                failing_call: str, message: str) -> None:
    app, fake = android_app
    fake.granted = {phone.READ_MEDIA_IMAGES, phone.CAMERA} if "permission" not in failing_call else set()
    fake.fail[failing_call] = JavaException("java.lang.SecurityException: denied by the test")
    getattr(app, action)()  # must return: a Java exception escaping a Kivy handler ends the app
    assert message in app.status and "SecurityException" in app.status, app.status
    assert app.status_level in ("warning", "error")
    app.open_photo(cell)  # and the app still works
    pump(lambda: not app.pending)
    assert app.result_label


def test_export_survives_a_java_exception_from_shared_storage(android_app, cell: Path) -> None:
    app, fake = android_app
    app.count_add([cell])
    pump(lambda: not app.pending)
    fake.fail["primary_external_storage_path"] = JavaException("java.lang.IllegalStateException: no storage")
    written = app.export_csv()
    assert written is not None and written.exists() and app.data_dir in written.parents
    assert app.status.startswith("Exported 1 cells")


def test_a_picked_photo_without_a_file_path_is_a_message(android_app) -> None:
    app, fake = android_app
    fake.granted = {phone.READ_MEDIA_IMAGES}
    fake.selection = [None]  # plyer could not resolve the content URI
    app.choose_photo()
    pump(lambda: "could not be opened" in app.status)
    assert app.status_level == "warning"


