"""The Kivy App (classify, differential count, about): its state and actions; inference runs on a worker thread."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

from kivy.app import App
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.graphics.texture import Texture
from kivy.properties import BooleanProperty, ListProperty, NumericProperty, ObjectProperty, StringProperty

from cellcore import imaging
from cellcore.files import atomic_write_text
from cellcore.panels import PANELS, PanelError, panel_label, resolve_panel
from cellcore.preprocess import Box, box_from_bounds, square_bounds
from mobile_app import __version__, phone
from mobile_app.classifier import UNCERTAIN_MESSAGE, CellClassifier, Prediction
from mobile_app.errors import USER_ERRORS, BadImageError, ModelError, RuntimeUnavailableError
from mobile_app.runtimes import JavaClasses, detect_platform, resolve_java_classes
from mobile_app.tally import TALLY_NAME, DifferentialCount, TallyError
# the screens' widgets; importing them registers them with Kivy's Factory for the .kv file
from mobile_app.widgets import ChooserPopup, ConfirmPopup, CorrectionPopup, PhotoView, Root

log = logging.getLogger(__name__)

CHOOSER_FILTERS = [f"*{e}" for e in imaging.IMAGE_EXTS] + [f"*{e.upper()}" for e in imaging.IMAGE_EXTS]


# ----------------------------------------------------------------------------- app

def uncertainty_text(rule) -> str:
    """The About screen's sentence for a cellcore.uncertainty.UncertaintyRule."""
    if rule.threshold is None:
        return f"no threshold reached the target accuracy on validation images: every result says \"{UNCERTAIN_MESSAGE}\""
    return (f"a result says \"{UNCERTAIN_MESSAGE}\" when its calibrated top probability is below {rule.threshold:.0%} "
            f"(temperature {rule.temperature:.2f}), or when the picture shows no stained cell or is too blurred"
            + (", or has a stain colour unlike the training pictures" if rule.checks.stain_hue else "")
            + (", or when the model's first answer is a class off the chosen panel" if rule.panel is not None else ""))


class CellClassifierApp(App):
    """State lives in the properties below; the .kv file draws them."""

    title = "Cell classifier (research use only)"
    model_state = StringProperty("loading")  # loading | ready | error
    model_name = StringProperty("")
    model_provider = StringProperty("")  # what computes inside the runtime: cpu, xnnpack, nnapi, coreml, ...
    model_error = StringProperty("")
    status = StringProperty("Loading model…")
    status_level = StringProperty("info")  # info | warning | error
    pending = NumericProperty(0)  # jobs queued or running on the worker thread
    photo_name = StringProperty("")
    photo_texture = ObjectProperty(None, allownone=True)
    photo_crop = ListProperty([0.0, 0.0, 1.0, 1.0])
    photo_path = StringProperty("")  # the photo on screen (the one a picked square belongs to)
    photo_size = ListProperty([0, 0])  # its (width, height) as stored
    pick_box = ListProperty([])  # the picked square (centre x, centre y, side) in the photo's pixels; [] = none
    pick_frac = ListProperty([0.0, 0.0, 0.0, 0.0])  # the same square as fractions, for drawing
    pick_side = NumericProperty(0.0)
    pick_side_min = NumericProperty(float(imaging.MIN_SIDE))
    pick_side_max = NumericProperty(1.0)
    pick_locked = BooleanProperty(False)  # the user sized the square: later taps on this photo keep the size
    result_label = StringProperty("")
    result_probability = NumericProperty(0.0)
    result_uncertain = BooleanProperty(False)
    result_message = StringProperty("")
    result_info = StringProperty("")
    top_labels = ListProperty(["", "", ""])
    top_values = ListProperty([0.0, 0.0, 0.0])
    count_total = NumericProperty(0)
    tally_rows = ListProperty([])  # RecycleView data for TallyRow
    entry_rows = ListProperty([])  # RecycleView data for EntryRow
    about_text = StringProperty("")
    camera_available = BooleanProperty(False)
    is_phone = BooleanProperty(False)
    panel = StringProperty("all")  # cellcore.panels: the classes this lab's slides can show (About screen)

    def __init__(self, model_dir: Path, fmt: str | None = None, data_dir: Path | None = None,
                 script: Path | None = None, result_path: Path | None = None, t0: float | None = None,
                 panel: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._t0 = t0 if t0 is not None else time.perf_counter()
        self.timing: dict[str, float] = {}  # seconds since launch: window up, model ready
        self.platform_name = detect_platform()
        self.is_phone = self.platform_name in ("android", "ios")
        # Java classes are looked up here, on the main thread, and handed to the runtimes that the worker
        # thread starts: pyjnius off the main thread cannot find the classes of the app's AARs.
        self.java: JavaClasses | None = self._resolve_java() if self.platform_name == "android" else None
        self.classifier = CellClassifier(model_dir, fmt=fmt, platform=self.platform_name, bridge=self.java,
                                         keep_display=True)
        self._data_dir_arg = data_dir
        self._panel_arg = panel  # --panel; else the one saved in settings.json; else every class
        self._script_path, self._result_path = script, result_path
        self._executor: ThreadPoolExecutor | None = None
        self.tally: DifferentialCount | None = None
        self.last_prediction: Prediction | None = None
        self.exit_code = 0
        self._last_folder = str(Path.home())
        self._script_runner: Any = None
        self._gesture_base: Box | None = None  # the picked square when the current drag or pinch started

    # ------------------------------------------------------------------ lifecycle

    def build(self) -> Root:
        return Root()

    @property
    def data_dir(self) -> Path:
        """--data-dir, else $CELLVIT_DATA_DIR, else Kivy's per-user data folder."""
        if self._data_dir_arg is not None:
            return Path(self._data_dir_arg)
        env = os.environ.get("CELLVIT_DATA_DIR")
        return Path(env) if env else Path(self.user_data_dir)

    def on_start(self) -> None:
        self.timing["ui_started_s"] = round(time.perf_counter() - self._t0, 3)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._restore_tally()
        self._restore_panel()
        self._setup_phone()
        self.set_status("Loading model…")
        self._submit(self.classifier.load, self._model_ready, self._model_failed)
        if self._script_path is not None:
            from mobile_app.scripting import ScriptRunner

            self._script_runner = ScriptRunner(self, self._script_path, self._result_path)  # Clock holds weak refs
            self._script_runner.start()

    def on_stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.tally is not None and self.tally.entries:
            try:
                self.tally.save()
            except TallyError as exc:
                log.error("%s", exc)
        self.classifier.close()

    def on_pause(self) -> bool:  # Android: keep running in the background (the count is saved anyway)
        return True

    @staticmethod
    def _resolve_java() -> JavaClasses | None:
        try:
            return resolve_java_classes()
        except RuntimeUnavailableError as exc:  # no pyjnius: loading the model will say so on screen
            log.error("%s", exc)
            return None

    def _setup_phone(self) -> None:
        """Permissions are asked for when the gallery or camera is first opened, not here."""
        if not self.is_phone:
            return
        try:
            from plyer import camera  # noqa: F401
            self.camera_available = True
        except ImportError:
            self.camera_available = False

    def _with_permissions(self, permissions: list[str], then: Callable[[], None]) -> None:
        """Run `then` once Android has granted `permissions` (asking the user if needed); else say what to do."""
        if self.platform_name != "android":
            then()
            return
        try:
            from android.permissions import check_permission, request_permissions
        except ImportError:  # not a python-for-android build: nothing to ask
            log.warning("android.permissions unavailable: not asking for %s", ", ".join(permissions))
            then()
            return

        def answered(granted_for: list[str], grants: list[bool]) -> None:  # runs on Android's UI thread
            Clock.schedule_once(lambda _dt: self._permissions_answered(permissions, granted_for, grants, then), 0)

        try:
            if all(check_permission(p) for p in permissions):
                then()
                return
            request_permissions(permissions, answered)
        except phone.platform_errors() as exc:
            self.set_status(f"Could not ask for permission ({exc}). {phone.refused_message(permissions)}", "error")

    def _permissions_answered(self, permissions: list[str], granted_for: list[str], grants: list[bool],
                              then: Callable[[], None]) -> None:
        answer = dict(zip(granted_for, grants))
        if all(answer.get(p) for p in permissions):
            then()
        else:
            self.set_status(phone.refused_message(permissions), "warning")

    # ------------------------------------------------------------------ worker thread

    def _submit(self, fn: Callable[..., Any], on_done: Callable[[Any], None],
                on_error: Callable[[BaseException], None], *args: Any) -> Future | None:
        """Run fn(*args) on the worker thread; on_done/on_error run on the Kivy main thread."""
        if self._executor is None:
            return None
        self.pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda f: Clock.schedule_once(partial(self._finish, f, on_done, on_error), 0))
        return future

    def _finish(self, future: Future, on_done: Callable[[Any], None], on_error: Callable[[BaseException], None],
                _dt: float) -> None:
        self.pending = max(0, self.pending - 1)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            on_done(future.result())
            return
        if not isinstance(exc, USER_ERRORS):  # a bug: keep the app alive and say so
            log.error("unexpected error on the worker thread", exc_info=exc)
        on_error(exc)

    # ------------------------------------------------------------------ status

    def set_status(self, text: str, level: str = "info") -> None:
        self.status, self.status_level = text, level
        (log.warning if level != "info" else log.info)("status: %s", text)

    def _model_ready(self, runtime: Any) -> None:
        self.timing["model_ready_s"] = round(time.perf_counter() - self._t0, 3)
        art = self.classifier.artifact
        self.model_state = "ready"
        self.model_provider = str(getattr(runtime, "provider", ""))
        provider = f", {self.model_provider}" if self.model_provider else ""
        self.model_name = f"{art.file} ({self.classifier.runtime_name}{provider})" if art else ""
        if self.tally is not None:
            self.tally.classes = list(self.classifier.manifest.classes)
            self._refresh_tally()
        self.about_text = self._about()
        if not self.pending:
            self.set_status("Ready: open a cell photo")

    def _model_failed(self, exc: BaseException) -> None:
        self.model_state = "error"
        self.model_error = str(exc)
        self.about_text = self._about(error=str(exc))
        self.set_status(f"Model problem: {exc}", "error")

    # ------------------------------------------------------------------ classify one photo

    def open_photo(self, path: Path | str) -> None:
        """Classify one photo and show it (file chooser, gallery, camera and scripts all come here)."""
        path = Path(path)
        self.photo_name = path.name
        self._last_folder = str(path.parent)
        if self.model_state == "error":
            self.set_status(f"Cannot classify {path.name}. Model problem: {self.model_error}", "error")
            return
        self.set_status(f"Classifying {path.name}…")
        self._submit(self.classifier.classify, self._show_prediction, partial(self._photo_failed, path), path)

    def _show_prediction(self, pred: Prediction) -> None:
        self.last_prediction = pred
        self._show_photo(pred)
        self.result_label = pred.label
        self.result_probability = pred.probability
        self.result_uncertain = pred.uncertain
        self.result_message = pred.message
        labels = [c for c, _ in pred.top] + [""] * 3
        values = [p for _, p in pred.top] + [0.0] * 3
        self.top_labels, self.top_values = labels[:3], values[:3]
        w, h = pred.image_size
        provider = f" ({self.model_provider})" if self.model_provider else ""
        self.result_info = (f"inference {pred.inference_ms:.1f} ms (total {pred.total_ms:.0f} ms) · "
                            f"{pred.runtime}{provider} · {w}x{h} px")
        if pred.uncertain:
            self.set_status(f"{Path(pred.path).name}: {pred.label} {pred.probability:.0%} — {pred.message}",
                            "warning")
        else:
            self.set_status(f"{Path(pred.path).name}: {pred.label} {pred.probability:.0%}")

    def _show_photo(self, pred: Prediction) -> None:
        img = pred.display.convert("RGBA")  # [H, W, 4] uint8; 4 bytes per pixel keeps GL rows aligned
        tex = Texture.create(size=img.size, colorfmt="rgba")
        tex.blit_buffer(img.tobytes(), colorfmt="rgba", bufferfmt="ubyte")
        tex.flip_vertical()
        self.photo_texture = tex
        w, h = pred.image_size
        left, top, right, bottom = pred.crop_box
        self.photo_crop = [left / w, top / h, right / w, bottom / h]
        if pred.path != self.photo_path or list(pred.image_size) != list(self.photo_size):
            self.photo_path, self.photo_size = pred.path, [w, h]
            self.pick_side_max = float(min(w, h))
            self.pick_side_min = float(min(imaging.MIN_SIDE, min(w, h)))
            self._clear_pick()
        if pred.box is not None:  # exactly the square that was classified (moved inside the photo)
            self._set_pick(pred.box, exact=True)

    # ------------------------------------------------------------------ picking one cell of a photo

    def pick_at(self, fx: float, fy: float) -> None:
        """A tap on the photo at (fx, fy) (fractions from its top-left): the square goes to the cell there.

        The suggestion (cellcore.preprocess.suggest_box, through the classifier, as `classify --box x,y`)
        is computed on the worker thread; a size the user set on this photo is kept.
        """
        if not self.photo_path:
            return
        w, h = self.photo_size
        x, y = min(max(fx, 0.0), 1.0) * w, min(max(fy, 0.0), 1.0) * h
        self._submit(self.classifier.suggest, self._pick_suggested, self._pick_failed, self.photo_path, x, y)

    def _pick_suggested(self, box: Box) -> None:
        if self.pick_locked and self.pick_box:
            box = (box[0], box[1], float(self.pick_side))
        self._set_pick(box)
        self.set_status(f"Square at {box[0]:.0f}, {box[1]:.0f}, side {self.pick_side:.0f} px: "
                        f"tap Classify square (drag, pinch or the slider to adjust)")

    def _pick_failed(self, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, BadImageError) else str(exc)
        self.set_status(f"Cannot pick a square: {reason}", "error")

    def begin_gesture(self) -> None:
        """A drag or pinch starts: it moves or sizes the square as it is now."""
        self._gesture_base = tuple(self.pick_box) if self.pick_box else None

    def drag_pick(self, dfx: float, dfy: float) -> None:
        """Move the square by the finger's way since the gesture started (photo fractions)."""
        base = self._gesture_base
        if base is not None and self.pick_box:
            w, h = self.photo_size
            self._set_pick((base[0] + dfx * w, base[1] + dfy * h, base[2]))

    def scale_pick(self, factor: float) -> None:
        """Pinch or mouse wheel: the side the square had when the gesture started, times `factor`."""
        base = self._gesture_base
        if base is not None and self.pick_box and factor > 0:
            self.pick_locked = True
            self._set_pick((self.pick_box[0], self.pick_box[1], base[2] * factor))

    def resize_pick(self, side: float) -> None:
        """The user chose a side on the slider: it stays for later taps on this photo (as a pinched one does)."""
        if self.pick_box:
            self.pick_locked = True
            self._set_pick((self.pick_box[0], self.pick_box[1], float(side)))

    def classify_pick(self) -> None:
        """Classify what the picked square holds (the manifest's preprocessing applied to the cut-out)."""
        if not self.pick_box or not self.photo_path:
            self.set_status("Tap a cell in the photo first", "warning")
            return
        if self.model_state == "error":
            self.set_status(f"Cannot classify. Model problem: {self.model_error}", "error")
            return
        path = Path(self.photo_path)
        box = tuple(self.pick_box)
        self.set_status(f"Classifying the square in {path.name}…")
        self._submit(partial(self.classifier.classify, box=box), self._show_prediction,
                     partial(self._photo_failed, path), path)

    def _set_pick(self, box: Box, exact: bool = False) -> None:
        """Show a square (photo pixels); unless `exact`, moved inside the photo as the classifier will move it."""
        w, h = self.photo_size
        if not (w and h):
            return
        bounds = (box[0] - box[2] / 2, box[1] - box[2] / 2, box[0] + box[2] / 2, box[1] + box[2] / 2) if exact \
            else square_bounds(box, w, h)
        cx, cy, side = box_from_bounds(bounds)
        self.pick_box = [cx, cy, side]
        self.pick_side = side
        self.pick_frac = [bounds[0] / w, bounds[1] / h, bounds[2] / w, bounds[3] / h]

    def _clear_pick(self) -> None:
        self.pick_box, self.pick_frac, self.pick_side, self.pick_locked = [], [0.0, 0.0, 0.0, 0.0], 0.0, False

    def _photo_failed(self, path: Path, exc: BaseException) -> None:
        if isinstance(exc, ModelError):
            self._model_failed(exc)
            return
        self.result_label, self.result_message, self.result_info = "", "", ""
        self.top_labels, self.top_values = ["", "", ""], [0.0, 0.0, 0.0]
        self.photo_texture, self.photo_path = None, ""
        self._clear_pick()
        reason = exc.reason if isinstance(exc, BadImageError) else str(exc)
        self.set_status(f"{path.name}: {reason}", "error")

    def add_last_to_count(self) -> None:
        pred = self.last_prediction
        if pred is None or self.tally is None:
            self.set_status("Classify a photo first", "warning")
            return
        self._add_to_tally(pred)

    # ------------------------------------------------------------------ differential count

    def _restore_tally(self) -> None:
        path = self.data_dir / TALLY_NAME
        try:
            self.tally = DifferentialCount.restore(path)
        except TallyError as exc:
            self.tally = DifferentialCount([], None)  # in memory only: never overwrite what we could not read
            self.set_status(str(exc), "error")
        if self.tally.notice:
            self.set_status(self.tally.notice, "warning")
        log.info("count restored from %s: %d cells", path, len(self.tally))
        self._refresh_tally()

    def count_add(self, paths: Sequence[Path | str]) -> None:
        """Classify photos (or every photo in folders) one after another and add each to the count."""
        files: list[Path] = []
        for p in map(Path, paths):
            files += imaging.list_images(p) if p.is_dir() else [p]
        if not files:
            self.set_status("No photos found there", "warning")
            return
        if self.model_state == "error":
            self.set_status(f"Cannot count. Model problem: {self.model_error}", "error")
            return
        self.set_status(f"Counting {len(files)} photo(s)…")
        for f in files:
            self._submit(self.classifier.classify, self._count_one, partial(self._count_failed, f), f)

    def _count_one(self, pred: Prediction) -> None:
        self._show_prediction(pred)
        self._add_to_tally(pred)

    def _count_failed(self, path: Path, exc: BaseException) -> None:
        self._photo_failed(path, exc)

    def _add_to_tally(self, pred: Prediction) -> None:
        assert self.tally is not None
        try:
            self.tally.add(pred.path, pred.label, pred.probability, pred.uncertain, pred.box)
        except TallyError as exc:
            self.set_status(f"Count NOT saved: {exc}", "error")
        self._refresh_tally()
        if self.pending <= 0 and self.status_level == "info":
            self.set_status(f"{len(self.tally)} cell(s) counted")

    def correct_entry(self, index: int, label: str) -> None:
        assert self.tally is not None
        try:
            e = self.tally.correct(index, label)
            self.set_status(f"#{index + 1} {Path(e.file).name}: counted as {label}")
        except (IndexError, ValueError) as exc:
            self.set_status(str(exc), "error")
        except TallyError as exc:
            self.set_status(f"Count NOT saved: {exc}", "error")
        self._refresh_tally()

    def remove_entry(self, index: int) -> None:
        assert self.tally is not None
        try:
            self.tally.remove(index)
        except IndexError as exc:
            self.set_status(str(exc), "error")
        except TallyError as exc:
            self.set_status(f"Count NOT saved: {exc}", "error")
        self._refresh_tally()

    def reset_count(self, confirmed: bool = False) -> None:
        if not confirmed:
            ConfirmPopup(title="Start a new count?",
                         message=f"This clears the count ({len(self.tally or [])} cells). Export it first if "
                                 f"you need it.", yes_action=lambda: self.reset_count(True)).open()
            return
        assert self.tally is not None
        try:
            self.tally.reset()
            self.set_status("New count started")
        except TallyError as exc:
            self.set_status(f"Count NOT saved: {exc}", "error")
        self._refresh_tally()

    def export_csv(self, path: Path | str | None = None) -> Path | None:
        assert self.tally is not None
        if path is None:
            path = self._export_dir() / f"differential-count-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        try:
            images, tally = self.tally.export_csv(path)
        except OSError as exc:
            self.set_status(f"Export failed: {exc}", "error")
            return None
        self.set_status(f"Exported {len(self.tally)} cells to {images.name} and {tally.name} in {images.parent}")
        return images

    def _export_dir(self) -> Path:
        if self.platform_name == "android":
            try:
                from android.storage import primary_external_storage_path

                return Path(primary_external_storage_path()) / "Documents" / "cellvit"
            except ImportError:
                log.warning("android.storage unavailable: exporting into the app's private folder")
            except phone.platform_errors() as exc:  # a Java exception from the storage lookup
                log.warning("shared storage unavailable (%s): exporting into the app's private folder", exc)
        return self.data_dir / "exports"

    def _refresh_tally(self) -> None:
        t = self.tally
        if t is None:
            return
        counts, pct = t.counts(), t.percentages()
        self.count_total = len(t)
        self.tally_rows = [{"name": k, "count": str(v), "percent": f"{pct[k]:.1f} %"} for k, v in counts.items()]
        rows = []
        for i, e in enumerate(t.entries):
            mark = f"{e.label}  (model: {e.predicted} {e.probability:.0%})" if e.corrected else \
                f"{e.label}  {e.probability:.0%}{'  uncertain' if e.uncertain else ''}"
            where = f" @{e.box[0]:.0f},{e.box[1]:.0f}" if e.box else ""  # which cell of the photo
            rows.append({"text": f"#{i + 1}  {Path(e.file).name}{where}:  {mark}", "index": i,
                         "corrected": e.corrected})
        self.entry_rows = list(reversed(rows))  # newest on top

    def open_correction(self, index: int) -> None:
        assert self.tally is not None
        if not 0 <= index < len(self.tally):
            return
        e = self.tally.entries[index]
        popup = CorrectionPopup(title=f"#{index + 1} {Path(e.file).name}: correct the label", index=index,
                                current=e.label)
        popup.classes = self.tally.all_classes()
        popup.open()

    # ------------------------------------------------------------------ choosing photos

    def choose_photo(self) -> None:
        self._choose(multiple=False, on_choose=lambda paths: self.open_photo(paths[0]))

    def choose_for_count(self) -> None:
        self._choose(multiple=True, on_choose=self.count_add)

    def _choose(self, multiple: bool, on_choose: Callable[[list[Path]], None]) -> None:
        if self.is_phone:
            perms = phone.photo_permissions(self.java.sdk_int if self.java else 0)
            self._with_permissions(perms, lambda: self._open_gallery(multiple, on_choose))
            return
        self._open_chooser(multiple, on_choose)

    def _open_chooser(self, multiple: bool, on_choose: Callable[[list[Path]], None]) -> None:
        ChooserPopup(title="Choose a folder or photos" if multiple else "Choose a cell photo",
                     multiple=multiple, start_path=self._last_folder, chosen_action=on_choose).open()

    def _open_gallery(self, multiple: bool, on_choose: Callable[[list[Path]], None]) -> None:
        """The system gallery through plyer; Kivy's own chooser where plyer has none; a message if it fails."""
        try:
            from plyer import filechooser
        except ImportError:
            self._open_chooser(multiple, on_choose)
            return

        def picked(selection: list[str | None] | None) -> None:  # plyer calls this from Android's UI thread
            # plyer gives None for a picked item it could not turn into a file path (a cloud-only photo)
            paths = [Path(s) for s in (selection or []) if s]
            if paths:
                Clock.schedule_once(lambda _dt: on_choose(paths), 0)
            elif selection:
                Clock.schedule_once(lambda _dt: self.set_status(
                    "The chosen photo could not be opened as a file: save it to the phone first", "warning"), 0)

        try:
            filechooser.open_file(on_selection=picked, multiple=multiple, filters=[["Images", *CHOOSER_FILTERS]])
        except NotImplementedError:
            self._open_chooser(multiple, on_choose)
        except phone.platform_errors() as exc:
            self.set_status(f"Gallery unavailable: {exc}", "error")

    def take_photo(self) -> None:
        self._with_permissions([phone.CAMERA], self._open_camera)

    def _open_camera(self) -> None:
        try:
            from plyer import camera
        except ImportError:
            self.set_status("No camera support on this device", "warning")
            return

        def done(path: str) -> bool:  # plyer calls this from Android's UI thread
            Clock.schedule_once(lambda _dt: self.open_photo(path), 0)
            return False

        try:
            target = self.data_dir / "camera" / f"cell-{time.strftime('%Y%m%d-%H%M%S')}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            camera.take_picture(filename=str(target), on_complete=done)
        except phone.platform_errors() as exc:
            self.set_status(f"Camera unavailable: {exc}. The gallery still works.", "warning")

    # ------------------------------------------------------------------ panel

    @property
    def settings_path(self) -> Path:
        return self.data_dir / "settings.json"

    def _restore_panel(self) -> None:
        """--panel, else the panel saved by the last session, else every class (checked when the model loads)."""
        panel = self._panel_arg
        if panel is None and self.settings_path.exists():
            try:
                panel = json.loads(self.settings_path.read_text()).get("panel")
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("%s unreadable (%s): starting on every class", self.settings_path, exc)
        panel = panel or "all"
        try:
            resolve_panel(panel, self.classifier.manifest.classes)
        except PanelError as exc:  # e.g. a panel saved for another model: this one's classes do not fit it
            log.warning("%s: starting on every class", exc)
            panel = "all"
        except ModelError:
            pass  # loading the model says what is wrong with it
        self.panel = panel
        self.classifier.panel = None if panel == "all" else panel

    def set_panel(self, name: str) -> None:
        """Choose the panel (About screen): later answers come from its classes; the photo on screen is
        classified again. A panel the model cannot take is refused, saying why, and the old one stays."""
        try:
            resolve_panel(name, self.classifier.manifest.classes)
        except (PanelError, ModelError) as exc:
            self.set_status(f"Panel not changed: {exc}", "error")
            self.property("panel").dispatch(self)  # the toggle buttons go back to the panel in use
            return
        self.panel = name
        self.classifier.panel = None if name == "all" else name
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.settings_path, json.dumps({"panel": name}))
        except OSError as exc:
            log.warning("could not save the panel to %s: %s", self.settings_path, exc)
        self.about_text = self._about() if self.model_state == "ready" else self.about_text
        self.set_status(f"Panel: {panel_label(name)}")
        if self.model_state == "ready" and self.last_prediction is not None and self.photo_path:
            if self.pick_box:
                self.classify_pick()
            else:
                self.open_photo(self.photo_path)

    # ------------------------------------------------------------------ about

    def _about(self, error: str = "") -> str:
        try:
            m = self.classifier.manifest
        except ModelError as exc:
            return f"[b]Cell classifier[/b] {__version__}\n\n[color=ff6666]{exc}[/color]"
        raw = m.raw
        model = raw.get("model", {})
        ds = raw.get("dataset", {})
        metrics = raw.get("metrics", {})
        train = metrics.get("training", {})
        verify = metrics.get("verify", {})
        unc = raw.get("uncertainty", {})
        counts = ds.get("train_counts") or {}
        lines = [f"[b]Cell classifier[/b]  app {__version__}  ·  model version {raw.get('version', '?')}  ·  "
                 f"manifest schema {raw.get('schema_version')}",
                 f"Model: {model.get('arch', '?')}, {model.get('params', '?')} parameters, epoch "
                 f"{model.get('epoch', '?')}, input {m.input_size}x{m.input_size} px, exported "
                 f"{raw.get('created_utc', '?')}",
                 f"In use: {self.model_name or 'not loaded'}" + ("  (sha256 verified)" if self.model_name else ""),
                 "",
                 f"[b]Classes ({len(m.classes)})[/b]: " + ", ".join(m.classes),
                 "",
                 f"[b]Training data[/b]: {ds.get('name', '?')}, {sum(counts.values()) if counts else '?'} training "
                 f"images" + (f", fingerprint {str(ds.get('fingerprint'))[:12]}" if ds.get("fingerprint") else "")]
        if counts:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        lines += ["", "[b]Measured accuracy[/b] (each number says which images it was measured on)"]
        if train:
            lines.append(f"  PyTorch on the validation split that chose this model (optimistic): accuracy "
                         f"{_pct(train.get('val_acc'))}, macro-F1 {_pct(train.get('val_macro_f1'))}")
        formats = {a.file: a for a in m.artifacts}
        if not verify:
            lines.append("  exported formats: not verified yet (run export verification)")
        else:
            lines.append(f"  on {_data_name(metrics.get('verify_source'))}:")
            lines += _verify_lines(verify, formats)
        for name, other in (metrics.get("verify_other") or {}).items():
            lines.append(f"  on {name} ({_data_name(other)}):")
            lines += _verify_lines(other.get("results") or {}, formats)
        on = PANELS.get(self.panel) or m.classes
        lines += ["", f"[b]Panel[/b]: {panel_label(self.panel)} ({', '.join(on)})"]
        lines += ["", "[b]Uncertainty[/b]: " + uncertainty_text(self.classifier.rule)]
        # the record of the file in use (export.verify fits one per format), else the manifest's own
        art = self.classifier.artifact
        chosen = (unc.get("per_artifact") or {}).get(art.file if art is not None else "", unc)
        if chosen.get("threshold") is not None and chosen.get("accuracy_at_or_above") is not None:
            missed = chosen.get("target_met") is False
            acc = chosen["accuracy_at_or_above"]  # 2 decimals when it missed: 98.99% is not "99.0%"
            lines.append(f"  at or above it: validation accuracy {f'{100 * acc:.2f} %' if missed else _pct(acc)} on "
                         f"{_pct(chosen.get('coverage'))} of cells"
                         + (f", [color=ffaa33]under the {_pct(unc.get('target_accuracy'))} target: no threshold "
                            f"reached it[/color]" if missed else ""))
        if error:
            lines += ["", f"[color=ff6666]{error}[/color]"]
        lines += ["", f"[b]Notice[/b]: {m.notice}"]
        return "\n".join(lines)

    # ------------------------------------------------------------------ scripting / tests

    def state(self) -> dict:
        """What the screen shows, as plain data (for scripted runs and their tests)."""
        t = self.tally
        return {
            "screen": self.root.ids.sm.current if self.root else "",
            "model_state": self.model_state, "model_name": self.model_name, "model_error": self.model_error,
            "provider": self.model_provider,
            "status": self.status, "status_level": self.status_level, "pending": self.pending,
            "photo": self.photo_name, "label": self.result_label,
            "probability": round(float(self.result_probability), 6), "uncertain": self.result_uncertain,
            "message": self.result_message, "top": [[c, round(float(p), 6)] for c, p in
                                                     zip(self.top_labels, self.top_values) if c],
            "info": self.result_info, "crop": list(self.photo_crop),
            "photo_size": list(self.photo_size), "box": list(self.pick_box), "box_locked": self.pick_locked,
            "box_on_screen": self._on_screen(self.pick_frac) if self.pick_box else [],
            "crop_on_screen": self._on_screen(self.photo_crop) if self.photo_texture is not None else [],
            "photo_on_screen": self._on_screen((0.0, 0.0, 1.0, 1.0)) if self.photo_texture is not None else [],
            "prediction_box": list(self.last_prediction.box) if self.last_prediction and
            self.last_prediction.box else None,
            "count_total": self.count_total, "counts": t.counts() if t else {},
            "entries": [{"file": e.file, "predicted": e.predicted, "label": e.label, "corrected": e.corrected,
                         "box": None if e.box is None else list(e.box)}
                        for e in (t.entries if t else [])],
            "about": self.about_text, "timing": dict(self.timing), "panel": self.panel,
        }

    def photo_view(self) -> PhotoView:
        return self.root.ids.sm.get_screen("classify").ids.photo

    def _on_screen(self, frac: Sequence[float]) -> list[float]:
        """A square in photo fractions -> where it is drawn: (left, top, right, bottom) in screenshot pixels."""
        if self.root is None:  # not built (tests that drive the app without a window)
            return []
        return [round(v, 1) for v in self.photo_view().window_rect(frac)]

    def show(self, screen: str) -> None:
        self.root.ids.sm.current = screen

    def save_screenshot(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        made = Path(Window.screenshot(name=str(path)))  # Kivy inserts a counter into the name
        made.replace(path)
        return path

    def finish_script(self, outcome: dict) -> None:
        if self._result_path is not None:
            Path(self._result_path).write_text(json.dumps(outcome, indent=1))
        self.exit_code = 0 if outcome.get("ok") else 1
        self.stop()


def _data_name(about: dict | None) -> str:
    """A verify record's source in words: which images, how many, and the data's fingerprint."""
    if not about:
        return "unrecorded images"
    src = str(about.get("source", "?"))
    kind = ("the held-out test split" if " test split" in src else
            "the validation split (chose the model: optimistic)" if "validation split" in src else Path(src).name)
    fp = str(about.get("fingerprint") or "")[:12]
    return f"{kind}, {about.get('images', '?')} images" + (f", fingerprint {fp}" if fp else "")


def _verify_lines(results: dict, formats: dict) -> list[str]:
    lines = []
    for file, v in results.items():
        a = formats.get(file)
        kind = f"{a.format} {a.precision}" if a else file
        ci = v.get("accuracy_ci95")
        ci_s = f" (95% CI {_pct(ci[0])}-{_pct(ci[1])})" if ci else ""
        on_panel = (f" (panel's answers {_pct(v['accuracy_panel'])})" if v.get("accuracy_panel") is not None
                    else "")
        lines.append(f"    {kind}: accuracy {_pct(v.get('accuracy'))}{ci_s}{on_panel}, macro-F1 {_pct(v.get('macro_f1'))}, "
                     f"agreement with PyTorch {_pct(v.get('agreement'))}"
                     + (f" · verify {v['status']}" if v.get("status") in ("PASS", "FAILED") else ""))
    return lines


def _pct(v: Any) -> str:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return f"{100 * float(v):.1f} %" if ok else "n/a"
