"""The one classification path shared by the UI and the CLI: manifest -> verified model -> prediction."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellcore import imaging
from cellcore.panels import PanelError, resolve_panel
from cellcore.preprocess import Box, box_from_bounds, square_bounds, suggest_box
from cellcore.uncertainty import UncertaintyRule, rule_for
from mobile_app.errors import BoxError, InferenceError, PanelChoiceError, RuntimeUnavailableError
from mobile_app.manifest import Artifact, Manifest, load_manifest, verify_artifact
from mobile_app.runtimes import PLATFORM_FORMATS, Runtime, create_runtime, detect_platform

log = logging.getLogger(__name__)

UNCERTAIN_MESSAGE = "uncertain — review by a hematologist"
TOP_K = 3

# A square asked for in the original photo's pixels: (centre x, centre y, side), side None = suggested.
PickRequest = tuple[float, float, "float | None"]


@dataclass(frozen=True)
class Prediction:
    """What the model says about one photo."""

    path: str
    label: str  # top-1 class
    probability: float  # top-1 probability
    top: list[tuple[str, float]]  # top-3 (class, probability), best first
    probabilities: list[float]  # [C], in manifest class order
    uncertain: bool  # picture checks failed, or calibrated probability < this model file's threshold
    threshold: float | None  # None: no threshold reached the target accuracy, every result is uncertain
    inference_ms: float  # runtime.run only
    total_ms: float  # decode + preprocess + inference
    image_size: tuple[int, int]  # original (width, height)
    crop_box: tuple[float, float, float, float]  # what the model saw (left, top, right, bottom), original pixels
    runtime: str
    model_file: str
    display: Any = field(default=None, repr=False, compare=False)  # small PIL RGB copy for the UI
    problems: tuple[str, ...] = ()  # cellcore.quality picture checks that failed (empty field, blurred, ...)
    # the square the user picked (centre x, centre y, side; original pixels) as it was cut out, i.e. moved
    # inside the photo; None: the whole photo went through the manifest's crop
    box: Box | None = None

    @property
    def message(self) -> str:
        if not self.uncertain:
            return ""
        return f"{UNCERTAIN_MESSAGE} ({'; '.join(self.problems)})" if self.problems else UNCERTAIN_MESSAGE

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "probability": round(self.probability, 6),
                "top": [[c, round(p, 6)] for c, p in self.top], "uncertain": self.uncertain,
                "message": self.message, "threshold": self.threshold, "problems": list(self.problems),
                "inference_ms": round(self.inference_ms, 3), "total_ms": round(self.total_ms, 3),
                "image_size": list(self.image_size), "crop_box": [round(v, 2) for v in self.crop_box],
                "box": None if self.box is None else [round(v, 2) for v in self.box],
                "runtime": self.runtime, "model_file": self.model_file}


class CellClassifier:
    """Loads the model lazily (first use or load()), thread-safe; classify() never returns a partial result.

    Model problems raise ModelError subclasses (ManifestError, ModelIntegrityError,
    RuntimeUnavailableError); photo problems raise BadImageError.
    """

    def __init__(self, model_dir: Path | str, fmt: str | None = None, platform: str | None = None,
                 bridge: Any = None, keep_display: bool = False, panel: str | None = None):
        self.model_dir = Path(model_dir)
        self.fmt = fmt
        # the classes the lab's slides can show (cellcore.panels); None: every class. Checked on load().
        self.panel = panel
        self.platform = platform or detect_platform()
        self._bridge = bridge
        self._keep_display = keep_display
        self._lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._decoded: tuple[tuple, imaging.DecodedImage] | None = None  # the last photo: picks reuse it
        self._manifest: Manifest | None = None
        self._artifact: Artifact | None = None
        self._runtime: Runtime | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            with self._lock:
                if self._manifest is None:
                    self._manifest = load_manifest(self.model_dir)
        return self._manifest

    @property
    def artifact(self) -> Artifact | None:
        return self._artifact

    @property
    def runtime_name(self) -> str:
        return self._runtime.name if self._runtime is not None else ""

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    def load(self) -> Runtime:
        """Read the manifest, check the model file's sha256, start the runtime (once).

        Without an explicit format, a runtime that is not available on this device (say ONNX
        Runtime missing from an Android build) hands over to the next format whose file is
        present; a file that fails its sha256 check is refused outright, never skipped.
        """
        manifest = self.manifest
        try:  # a panel that does not fit is refused before any model file is read
            resolve_panel(self.panel, manifest.classes)
        except PanelError as exc:
            raise PanelChoiceError(str(exc)) from exc
        with self._lock:
            if self._runtime is not None:
                return self._runtime
            supported = PLATFORM_FORMATS.get(self.platform, ())
            candidates = manifest.candidates(supported, self.fmt)
            for i, artifact in enumerate(candidates):
                path = verify_artifact(artifact)
                t0 = time.perf_counter()
                try:
                    runtime = create_runtime(artifact, path, self.platform, manifest.classes,
                                             manifest.input_size, self._bridge)
                except RuntimeUnavailableError as exc:
                    if i + 1 == len(candidates):
                        raise
                    log.warning("%s; trying %s instead", exc, candidates[i + 1].file)
                    continue
                self._runtime, self._artifact = runtime, artifact
                log.info("model %s ready on %s in %.0f ms", artifact.file, runtime.name,
                         (time.perf_counter() - t0) * 1e3)
                return runtime
            raise RuntimeUnavailableError("no model could be loaded")  # unreachable: the loop returns or raises

    def close(self) -> None:
        with self._lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime = None

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """[1, 3, S, S] float32 in 0..1 -> (the model's output row, inference ms): [C] logits or probabilities,
        then the feature distance if this file carries one (manifest artifacts[].feature_distance_column)."""
        runtime = self.load()
        manifest = self.manifest
        t0 = time.perf_counter()
        with self._lock:  # one inference at a time per session
            out = runtime.run(x)  # [C] or [C + 1]
        ms = (time.perf_counter() - t0) * 1e3
        assert self._artifact is not None
        expected = len(manifest.classes) + (self._artifact.distance_column is not None)
        if out.shape != (expected,) or not np.all(np.isfinite(out)):
            raise InferenceError(f"model returned {out.shape} values (expected {expected} finite ones)")
        return out, ms

    def probabilities(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """[1, 3, S, S] float32 in 0..1 -> ([C] probabilities, inference ms)."""
        out, ms = self.outputs(x)
        # calibrated: this model file's own temperature (cellcore.uncertainty), 1 for old manifests
        return self.rule.probabilities(out, self._runtime.output_kind), ms

    @property
    def rule(self) -> UncertaintyRule:
        """The uncertainty rule of the loaded model file, as export verification chose it, on the chosen panel."""
        return rule_for(self.manifest.raw, self._artifact.file if self._artifact is not None else None, self.panel)

    def classify(self, path: Path | str, box: PickRequest | None = None) -> Prediction:
        """Decode, crop, resize, run, softmax: one photo -> Prediction.

        Without `box` the whole photo goes through the manifest's preprocessing. With a box (centre x,
        centre y, side in the original file's pixels; side None = suggest_box's) the square is cut out
        of the photo (moved inside it where it runs off) and the cut-out goes through the very same
        preprocessing as a whole photo would, so the model sees what training showed it.
        """
        t0 = time.perf_counter()
        manifest = self.manifest
        self.load()  # model errors surface before the photo is even opened
        decoded = self._decode(path)
        prep = manifest.preprocessing or imaging.Preprocessing(manifest.input_size)
        if box is None:
            image, ox, oy, picked = decoded.rgb, 0, 0, None
        else:
            bounds = self._pick_bounds(decoded, box)  # decoded pixels
            image, (ox, oy) = decoded.rgb.crop(bounds), bounds[:2]  # where the cut-out sits in the photo
            picked = box_from_bounds(decoded.to_original(bounds))
        x = imaging.to_input(image, prep)  # [1, 3, S, S] float32 in 0..1
        out, ms = self.outputs(x)
        rule = self.rule
        probs = rule.probabilities(out, self._runtime.output_kind)
        problems = tuple(rule.checks.problems(image))
        distance = rule.distances(out)
        if rule.far(distance):  # rule step 5: confident or not, the features are unlike every training cell's
            problems += (f"unlike the training cells (feature distance {float(distance):.2f} > "
                         f"{rule.max_distance:.2f}): fine-tune on this lab's cells",)
        order = np.argsort(-probs, kind="stable")
        top = [(manifest.classes[i], float(probs[i])) for i in order[:TOP_K]]
        label, p = top[0]
        if int(order[0]) in rule.not_a_cell:  # the export declared this class "not a white cell"
            problems += (f"no white cell: the model sees {label}",)
        if rule.off_panel(out):  # rule step 6: the model's first answer is a class the lab does not expect
            first = manifest.classes[int(np.argmax(out[:len(manifest.classes)]))]
            problems += (f"the model's first answer, {first}, is not on the {self.panel} panel",)
        l, t, r, b = prep.box_for(image)  # the model's square inside what was classified
        assert self._artifact is not None and self._runtime is not None
        return Prediction(
            path=str(path), label=label, probability=p, top=top, probabilities=[float(v) for v in probs],
            uncertain=rule.uncertain(p, problems), threshold=rule.threshold, problems=problems, inference_ms=ms,
            total_ms=(time.perf_counter() - t0) * 1e3, image_size=decoded.original_size,
            crop_box=decoded.to_original((l + ox, t + oy, r + ox, b + oy)), runtime=self._runtime.name,
            model_file=self._artifact.file, box=picked,
            display=imaging.display_copy(decoded) if self._keep_display else None)

    def suggest(self, path: Path | str, x: float, y: float) -> Box:
        """The square a tap at (x, y) picks (cellcore.preprocess.suggest_box, moved inside the photo).

        In and out in the original file's pixels; a huge photo is analysed at its decoded size.
        """
        decoded = self._decode(path)
        return box_from_bounds(decoded.to_original(self._pick_bounds(decoded, (x, y, None))))

    def _pick_bounds(self, decoded: imaging.DecodedImage, box: PickRequest) -> tuple[int, int, int, int]:
        """A requested square (original pixels) -> the integer square to cut from `decoded.rgb`."""
        w, h = decoded.original_size
        try:
            cx, cy = float(box[0]), float(box[1])
            side = None if box[2] is None else float(box[2])
        except (TypeError, ValueError, IndexError) as exc:
            raise BoxError(f"a square is x,y or x,y,size in pixels, got {box!r}") from exc
        if not (0 <= cx <= w and 0 <= cy <= h):  # also refuses nan
            raise BoxError(f"the square's centre ({cx:g}, {cy:g}) is outside the {w}x{h} px photo")
        if side is not None and not (side > 0 and np.isfinite(side)):
            raise BoxError(f"the square's size must be a positive number of pixels, got {side:g}")
        s = decoded.scale  # original -> decoded pixels (1 unless a huge photo was decoded downscaled)
        wanted = suggest_box(decoded.rgb, cx * s, cy * s) if side is None else (cx * s, cy * s, side * s)
        return square_bounds(wanted, *decoded.rgb.size)

    def _decode(self, path: Path | str) -> imaging.DecodedImage:
        """imaging.decode, reusing the last photo while its file is unchanged (picking cells decodes once)."""
        path = Path(path)
        try:
            st = path.stat()
            key: tuple | None = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            key = None  # decode() says what is wrong with the path
        with self._decode_lock:
            if key is not None and self._decoded is not None and self._decoded[0] == key:
                return self._decoded[1]
        decoded = imaging.decode(path)
        if key is not None:
            with self._decode_lock:
                self._decoded = (key, decoded)
        return decoded
