"""Kivy widgets of the app's screens (their layout is in cellclassifier.kv; the App is mobile_app.ui).

Kivy registers every Widget subclass with its Factory when the class is defined, which is how the .kv file
finds them: mobile_app.ui imports this module before the .kv is loaded.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from kivy.app import App
from kivy.core.window import Window
from kivy.metrics import dp
from kivy.properties import BooleanProperty, ListProperty, NumericProperty, ObjectProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.image import Image as KivyImage
from kivy.uix.popup import Popup
from kivy.uix.screenmanager import Screen
from kivy.uix.slider import Slider


class PhotoView(KivyImage):
    """The photo with the classified square (green) and the square the user picks (cyan) drawn on it.

    Squares are (left, top, right, bottom) as fractions of the photo. A finger that lands and lifts
    without moving fires on_pick (a tap: the square goes to that cell). A moving finger or two fingers
    fire on_gesture_start, then on_drag with the finger's way since then (photo fractions: the square
    follows it) or on_pinch with the fingers' distance over theirs then (the square grows or shrinks
    by it); a mouse wheel pinches by 10% a notch. Totals since the start, not steps, so the square's
    whole-pixel rounding never adds up over a gesture.
    """

    crop = ListProperty([0.0, 0.0, 1.0, 1.0])
    show_crop = BooleanProperty(False)
    pick = ListProperty([0.0, 0.0, 0.0, 0.0])
    show_pick = BooleanProperty(False)
    __events__ = ("on_pick", "on_gesture_start", "on_drag", "on_pinch")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._fingers: dict[int, tuple[float, float]] = {}  # touch uid -> position now (parent's coordinates)
        self._anchor: dict[int, tuple[float, float]] = {}  # ... when the set of fingers last changed
        self._gesture = False  # since the first finger landed they moved or pinched: not a tap
        self._started = False  # on_gesture_start sent for the current set of fingers

    def on_pick(self, fx: float, fy: float) -> None:
        pass

    def on_gesture_start(self) -> None:
        pass

    def on_drag(self, dfx: float, dfy: float) -> None:
        pass

    def on_pinch(self, factor: float) -> None:
        pass

    def photo_fraction(self, x: float, y: float) -> tuple[float, float] | None:
        """A point in the parent's coordinates -> (x, y) as fractions of the photo from its top-left, or None."""
        iw, ih = self.norm_image_size
        if self.texture is None or iw <= 0 or ih <= 0:
            return None
        fx, fy = (x - (self.center_x - iw / 2)) / iw, 1 - (y - (self.center_y - ih / 2)) / ih
        return (fx, fy) if 0 <= fx <= 1 and 0 <= fy <= 1 else None

    def window_rect(self, frac: Sequence[float]) -> tuple[float, float, float, float]:
        """A square in photo fractions -> (left, top, right, bottom) in window pixels from the top-left."""
        iw, ih = self.norm_image_size
        x0, y0 = self.to_window(self.center_x - iw / 2 + frac[0] * iw, self.center_y - ih / 2 + (1 - frac[3]) * ih)
        x1, y1 = self.to_window(self.center_x - iw / 2 + frac[2] * iw, self.center_y - ih / 2 + (1 - frac[1]) * ih)
        return (x0, Window.height - y1, x1, Window.height - y0)

    def _regroup(self) -> None:
        """Fingers landed or lifted: later moves count from where every finger is now."""
        self._anchor, self._started = dict(self._fingers), False

    def on_touch_down(self, touch: Any) -> bool:
        if not self.collide_point(*touch.pos) or self.photo_fraction(*touch.pos) is None:
            return super().on_touch_down(touch)
        if touch.is_mouse_scrolling:
            self.dispatch("on_gesture_start")
            self.dispatch("on_pinch", 1.1 if touch.button == "scrollup" else 1 / 1.1)
            return True
        touch.grab(self)
        self._gesture = bool(self._fingers)  # a second finger: a pinch, never a tap
        self._fingers[touch.uid] = touch.pos
        self._regroup()
        return True

    def on_touch_move(self, touch: Any) -> bool:
        if touch.grab_current is not self:
            return super().on_touch_move(touch)
        iw, ih = self.norm_image_size
        if touch.uid not in self._fingers or iw <= 0 or ih <= 0:
            return True
        self._fingers[touch.uid] = touch.pos
        first, *rest = self._anchor
        if not rest and not self._gesture and math.dist(touch.pos, self._anchor[first]) <= dp(8):
            return True  # a shaky tap is still a tap
        self._gesture = True
        if not self._started:
            self._started = True
            self.dispatch("on_gesture_start")
        if rest:
            before = math.dist(self._anchor[first], self._anchor[rest[0]])
            if before > 1:
                self.dispatch("on_pinch", math.dist(self._fingers[first], self._fingers[rest[0]]) / before)
        else:
            (x0, y0), (x1, y1) = self._anchor[first], self._fingers[first]
            self.dispatch("on_drag", (x1 - x0) / iw, -(y1 - y0) / ih)
        return True

    def on_touch_up(self, touch: Any) -> bool:
        if touch.grab_current is not self:
            return super().on_touch_up(touch)
        touch.ungrab(self)
        self._fingers.pop(touch.uid, None)
        self._regroup()
        if not self._fingers and not self._gesture:
            frac = self.photo_fraction(*touch.pos)
            if frac is not None:
                self.dispatch("on_pick", *frac)
        return True


class SideSlider(Slider):
    """The picked square's side. on_user_value fires only for a finger on the slider: the app also moves
    `value` (a new suggestion), which must not count as the user choosing a size."""

    __events__ = ("on_user_value",)

    def on_user_value(self, value: float) -> None:
        pass

    def on_touch_down(self, touch: Any) -> bool:
        handled = bool(super().on_touch_down(touch))  # True only for a touch on this (enabled) slider
        if handled:
            self.dispatch("on_user_value", self.value)
        return handled

    def on_touch_move(self, touch: Any) -> bool:
        handled = bool(super().on_touch_move(touch))
        if touch.grab_current is self:
            self.dispatch("on_user_value", self.value)
        return handled


class ProbBar(BoxLayout):
    """One of the top-3 rows: class name, bar, percentage."""

    label = StringProperty("")
    value = NumericProperty(0.0)  # 0..1


class EntryRow(Button):
    """One cell of the differential count; tap to correct its label."""

    index = NumericProperty(0)
    corrected = BooleanProperty(False)


class TallyRow(BoxLayout):
    name = StringProperty("")
    count = StringProperty("")
    percent = StringProperty("")


class ClassifyScreen(Screen):
    pass


class CountScreen(Screen):
    pass


class AboutScreen(Screen):
    pass


class Root(BoxLayout):
    pass


class ChooserPopup(Popup):
    """Desktop file chooser (Kivy's own; phones use the system picker through plyer)."""

    multiple = BooleanProperty(False)
    start_path = StringProperty("")
    chosen_action = ObjectProperty(None, allownone=True)  # called with [Path, ...]

    def choose(self, selection: list[str], folder: str) -> None:
        paths = [Path(p) for p in selection] or ([Path(folder)] if self.multiple and folder else [])
        self.dismiss()
        if paths and self.chosen_action is not None:
            self.chosen_action(paths)


class CorrectionPopup(Popup):
    """Pick the right class for one counted cell, or remove it from the count."""

    index = NumericProperty(0)
    classes = ListProperty([])
    current = StringProperty("")

    def on_classes(self, *_: Any) -> None:
        grid = self.ids.grid
        grid.clear_widgets()
        for name in self.classes:
            btn = Button(text=name, size_hint_y=None, height=dp(44), bold=name == self.current)
            btn.bind(on_release=partial(self._pick, name))
            grid.add_widget(btn)

    def _pick(self, name: str, *_: Any) -> None:
        self.dismiss()
        App.get_running_app().correct_entry(self.index, name)


class ConfirmPopup(Popup):
    message = StringProperty("")
    yes_action = ObjectProperty(None, allownone=True)  # called when confirmed
