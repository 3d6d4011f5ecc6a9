"""Starts the Kivy UI: sets Kivy's environment and window before Kivy is imported, then runs the App."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

DESKTOP_WINDOW = (600, 960)  # portrait, like a phone


def run_app(model_dir: Path, fmt: str | None = None, data_dir: Path | None = None,
            script: Path | None = None, result: Path | None = None, panel: str | None = None) -> int:
    """Run the UI until it is closed; with `script`, play the steps and return 0 only if all passed."""
    t0 = time.perf_counter()
    os.environ.setdefault("KIVY_NO_ARGS", "1")  # our argv is not Kivy's
    os.environ.setdefault("KIVY_NO_FILELOG", "1")
    from mobile_app.runtimes import detect_platform

    if detect_platform() == "desktop":
        preload_desktop_executorch(Path(model_dir), fmt)
        from kivy.config import Config

        Config.set("graphics", "width", str(DESKTOP_WINDOW[0]))
        Config.set("graphics", "height", str(DESKTOP_WINDOW[1]))
        Config.set("input", "mouse", "mouse,multitouch_on_demand")
        Config.set("kivy", "exit_on_escape", "0")
    from mobile_app.ui import CellClassifierApp

    app = CellClassifierApp(model_dir=Path(model_dir), fmt=fmt, data_dir=data_dir, script=script,
                            result_path=result, t0=t0, panel=panel)
    app.run()
    return app.exit_code


def preload_desktop_executorch(model_dir: Path, fmt: str | None) -> None:
    """Import ExecuTorch's desktop runtime (and with it torch) before Kivy opens its window, when that is what
    will run the model: imported after the window exists, torch._dynamo crashes the process (segfault, seen
    with the shipped .pte bundle under Xvfb). Phones run .pte files through executorch-android instead."""
    from mobile_app.errors import ModelError
    from mobile_app.manifest import load_manifest
    from mobile_app.runtimes import PLATFORM_FORMATS

    try:
        chosen = load_manifest(model_dir).choose(PLATFORM_FORMATS["desktop"], fmt)
    except ModelError:
        return  # the UI will say what is wrong with the model
    if chosen.format == "executorch":
        try:
            import executorch.runtime  # noqa: F401  (imported for its side effect: torch loaded early)
            import torch._dynamo  # noqa: F401
        except ImportError:
            pass  # no ExecuTorch here: loading the model will say so on screen
