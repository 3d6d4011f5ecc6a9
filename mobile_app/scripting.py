"""Plays a JSON list of UI steps inside the running app (UI tests, demos) and writes what the screen showed.

A script is a list of steps, each {"do": ACTION, ...}:
  wait_model                      until the model is loaded (or failed)
  open        path                classify one photo, as the file chooser / gallery does
  count_add   paths               classify photos / folders into the differential count
  wait_idle                       until the worker thread has nothing left
  correct     index, label        hand-correct entry `index` of the count
  export_csv  path                export the count (per-image CSV + <stem>_tally.csv)
  screen      name                show 'classify', 'count' or 'about'
  tap         text | prefix       press the visible, enabled button with that text (or text prefix), as a finger
  chooser     path, select        in the open file chooser, go to folder `path` and select files `select`
  tap_photo   x, y                a finger taps the shown photo at (x, y), pixels of the photo as stored
  drag_photo  x, y, to            a finger lands at (x, y) and slides to `to` [x, y] (photo pixels)
  pinch_photo x, y, factor        two fingers around (x, y) spread (factor > 1) or close (< 1)
  slide       value               a finger on the square-size slider at `value` (photo pixels)
  screenshot  path                save a PNG of the window
  record      name                store the app state under records[name] in the result
  quit                            stop (also implied at the end)
Each step may give "timeout" seconds (default 120).
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from kivy.clock import Clock

log = logging.getLogger(__name__)

ACTIONS = ("wait_model", "open", "count_add", "wait_idle", "correct", "export_csv", "screen", "tap", "chooser",
           "tap_photo", "drag_photo", "pinch_photo", "slide", "screenshot", "record", "quit")


class ScriptError(ValueError):
    pass


def load_script(path: Path) -> list[dict]:
    try:
        steps = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ScriptError(f"cannot read script {path}: {exc}") from exc
    if not isinstance(steps, list) or not all(isinstance(s, dict) and s.get("do") in ACTIONS for s in steps):
        raise ScriptError(f"{path}: a script is a list of {{'do': one of {', '.join(ACTIONS)}, ...}}")
    return steps


class ScriptRunner:
    """Polls every 50 ms on the Kivy clock; one step at a time, each waits for its condition."""

    def __init__(self, app: Any, script: Path, result: Path | None):
        self.app, self.result = app, result
        self.outcome: dict = {"ok": False, "steps_done": 0, "records": {}, "screenshots": [], "error": ""}
        try:
            self.steps = load_script(script)
        except ScriptError as exc:
            self.steps = []
            self.outcome["error"] = str(exc)
        self._i = 0
        self._started: float | None = None
        self._frames = 0
        self._event = None

    def start(self) -> None:
        if self.outcome["error"]:
            Clock.schedule_once(lambda _dt: self.app.finish_script(self.outcome), 0)
            return
        self._event = Clock.schedule_interval(self._tick, 0.05)

    def _tick(self, _dt: float) -> bool:
        if self._i >= len(self.steps):
            return self._end(ok=True)
        step = self.steps[self._i]
        if self._started is None:
            self._started, self._frames = time.monotonic(), 0
            log.info("script step %d: %s", self._i, step)
        self._frames += 1
        try:
            done = self._run(step)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            self.outcome["error"] = f"step {self._i} {step}: {type(exc).__name__}: {exc}"
            return self._end(ok=False)
        if done:
            self._i += 1
            self._started = None
            self.outcome["steps_done"] = self._i
        elif time.monotonic() - self._started > float(step.get("timeout", 120)):
            self.outcome["error"] = f"step {self._i} {step} timed out; state: {self.app.state()}"
            return self._end(ok=False)
        return True

    def _run(self, step: dict) -> bool:
        app, do = self.app, step["do"]
        first = self._frames == 1
        if do == "wait_model":
            return app.model_state in ("ready", "error")
        if do == "wait_idle":
            return app.pending == 0 and self._frames > 2
        if do == "open":
            if first:
                app.open_photo(step["path"])
            return True
        if do == "count_add":
            if first:
                app.count_add(step["paths"])
            return True
        if do == "correct":
            app.correct_entry(int(step["index"]), step["label"])
            return True
        if do == "export_csv":
            path = app.export_csv(step["path"])
            self.outcome.setdefault("exports", []).append(str(path) if path else None)
            return True
        if do == "screen":
            app.show(step["name"])
            return True
        if do == "tap":
            return self._tap(step)
        if do == "chooser":
            return self._chooser(step)
        if do in ("tap_photo", "drag_photo", "pinch_photo"):
            return self._touch_photo(step)
        if do == "slide":
            return self._slide(float(step["value"]))
        if do == "screenshot":
            if self._frames < 6:  # let a few frames render the latest state
                return False
            self.outcome["screenshots"].append(str(app.save_screenshot(step["path"])))
            return True
        if do == "record":
            self.outcome["records"][step["name"]] = app.state()
            return True
        if do == "quit":
            self._i = len(self.steps)
            return True
        raise ValueError(f"unknown step {do!r}")

    @staticmethod
    def _widgets() -> list[Any]:
        """What a finger can reach: the topmost open popup, else the root (ScreenManager holds one screen)."""
        from kivy.core.window import Window

        return list(Window.children[0].walk(restrict=True)) if Window.children else []

    def _tap(self, step: dict) -> bool:
        from kivy.uix.button import ButtonBehavior

        text, prefix = step.get("text"), step.get("prefix")
        for w in self._widgets():
            if isinstance(w, ButtonBehavior) and not w.disabled and w.opacity > 0 and \
                    (w.text == text or (prefix is not None and w.text.startswith(prefix))):
                w.dispatch("on_press")
                w.dispatch("on_release")
                return True
        return False  # not there yet (a popup still opening): try again next tick, until the timeout

    def _chooser(self, step: dict) -> bool:
        from kivy.uix.filechooser import FileChooserListView

        for w in self._widgets():
            if isinstance(w, FileChooserListView):
                w.path = str(step["path"])
                w.selection = [str(Path(step["path"]) / f) for f in step.get("select", [])]
                return True
        return False

    def _touch_photo(self, step: dict) -> bool:
        """Fingers on the photo, through Kivy's input queue (as a screen's touches arrive), not method calls."""
        app = self.app
        if not app.photo_path:
            return False  # no photo on screen yet
        view = app.photo_view()
        w, h = app.photo_size

        def at(x: float, y: float) -> tuple[float, float]:  # photo pixels -> window pixels (origin bottom-left)
            iw, ih = view.norm_image_size
            return view.to_window(view.center_x - iw / 2 + x / w * iw, view.center_y - ih / 2 + (1 - y / h) * ih)

        x, y = float(step["x"]), float(step["y"])
        do = step["do"]
        if do == "tap_photo":
            finger = Finger(*at(x, y))
            finger.down()
            finger.up()
        elif do == "drag_photo":
            to = [float(v) for v in step["to"]]
            finger = Finger(*at(x, y))
            finger.down()
            for k in range(1, 11):  # a finger slides through the move events a screen reports
                finger.move(*at(x + (to[0] - x) * k / 10, y + (to[1] - y) * k / 10))
            finger.up()
        else:
            factor, spread = float(step["factor"]), float(step.get("spread", 40))  # spread: window pixels
            cx, cy = at(x, y)
            left, right = Finger(cx - spread, cy), Finger(cx + spread, cy)
            left.down()
            right.down()
            for k in range(1, 11):
                d = spread * (1 + (factor - 1) * k / 10)
                left.move(cx - d, cy)
                right.move(cx + d, cy)
            left.up()
            right.up()
        return True

    def _slide(self, value: float) -> bool:
        from mobile_app.widgets import SideSlider

        slider = next((w for w in self._widgets() if isinstance(w, SideSlider) and not w.disabled), None)
        if slider is None or slider.max <= slider.min:
            return False
        pad = slider.padding  # where Slider.value_pos puts min and max
        frac = (min(max(value, slider.min), slider.max) - slider.min) / (slider.max - slider.min)
        x = slider.x + pad + frac * (slider.width - 2 * pad)
        finger = Finger(*slider.to_window(x, slider.center_y))
        finger.down()
        finger.up()
        return True

    def _end(self, ok: bool) -> bool:
        if self._event is not None:
            self._event.cancel()
        self.outcome["ok"] = ok and not self.outcome["error"]
        self.outcome["final"] = self.app.state()
        log.info("script finished: ok=%s %s", self.outcome["ok"], self.outcome["error"])
        self.app.finish_script(self.outcome)
        return False


class Finger:
    """One finger on the screen at window pixels, posted through Kivy's input queue like a real touch."""

    _ids = itertools.count(1)

    def __init__(self, x: float, y: float):
        from kivy.base import EventLoop
        from kivy.input.motionevent import MotionEvent

        class _Touch(MotionEvent):
            def depack(self, args: dict) -> None:
                self.sx, self.sy = args["sx"], args["sy"]
                self.profile = ["pos"]
                super().depack(args)

        self._loop = EventLoop
        self._touch = _Touch("script", next(self._ids), self._where(x, y), is_touch=True, type_id="touch")

    def _where(self, x: float, y: float) -> dict:
        win = self._loop.window
        return {"sx": x / (win.width - 1.0), "sy": y / (win.height - 1.0)}  # as the window's providers give them

    def down(self) -> None:
        self._loop.post_dispatch_input("begin", self._touch)

    def move(self, x: float, y: float) -> None:
        self._touch.move(self._where(x, y))
        self._loop.post_dispatch_input("update", self._touch)

    def up(self) -> None:
        self._loop.post_dispatch_input("end", self._touch)
