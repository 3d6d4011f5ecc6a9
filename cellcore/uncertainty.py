"""When a prediction is "uncertain, review by a hematologist": calibrated probabilities, per-format thresholds.

The rule, the same in verification, benchmarks and the app:
1. the picture checks (cellcore.quality) found a problem -> uncertain, whatever the model says;
2. else p = softmax(logits / T), T the artifact's temperature fitted on validation images (an int8
   model's logits differ from fp32's, so each exported file has its own T and threshold);
3. uncertain when max(p) < the artifact's threshold: the smallest t at which the validation
   predictions with max(p) >= t are at least `target` accurate. When no t reaches it (a fine-tuned
   lab model's few hundred held-out cells can miss 99% by one cell), the t whose accepted predictions
   have the highest lower 95% bound on their accuracy, recorded with `target_met: false` and the
   accuracy it reaches (export warns, verify and the app's About screen say so); `null` (every
   prediction uncertain) only when no validation prediction is right;
4. uncertain when the predicted class is one the export declared "not a white cell"
   (manifest uncertainty.not_a_white_cell, e.g. PBC's `platelet`: a field with platelets and red
   cells but no white cell). The app counts white cells; such a picture is shown with the model's
   answer but flagged, as are the red-cell-only fields and platelet clumps that models answer
   with that class;
5. uncertain when the exported file carries the feature distance (train.distance: an extra output column
   after the C logits) and it exceeds the file's `max_distance`, fitted on the validation split: the
   picture's features lie far from every training class, however confident the model is;
6. with a panel (cellcore.panels: the classes a lab's slides can show, e.g. the five-part differential), the
   probabilities are a softmax over the panel's classes only (the others get 0), and a picture whose most
   probable class over all the model's classes is off the panel is uncertain: the lab does not expect it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from cellcore.panels import resolve_panel
from cellcore.quality import PictureChecks

TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
THRESHOLDS = np.round(np.arange(0.30, 0.995, 0.005), 3)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[N, C] or [C] logits -> probabilities of the same shape."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of the labels (temperature scaling, Guo et al. 2017)."""
    idx = np.arange(len(labels))
    nll = [-np.log(softmax(logits, t)[idx, labels].astype(np.float64) + 1e-12).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small n and for k near 0 or n)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def choose_threshold(probs: np.ndarray, labels: np.ndarray, target: float) -> dict:
    """Smallest t such that predictions with max(p) >= t are at least `target` accurate (target_met True).

    If no t reaches it: the t maximising the lower Wilson bound of the accepted predictions' accuracy, which
    weighs accuracy against how few predictions back it (a t keeping 3 right answers does not win), with
    target_met False. threshold None only when no t keeps a right prediction.
    """
    top, correct = probs.max(1), probs.argmax(1) == labels

    def record(t: float, keep: np.ndarray, met: bool) -> dict:
        return {"threshold": float(t), "accuracy_at_or_above": float(correct[keep].mean()),
                "accuracy_ci95": wilson(int(correct[keep].sum()), int(keep.sum())), "target_met": met,
                "coverage": float(keep.mean()), "n": int(len(labels)), "accepted": int(keep.sum())}

    best, best_lo = None, 0.0
    for t in THRESHOLDS:
        keep = top >= t
        if not keep.any():
            break
        if correct[keep].mean() >= target:
            return record(t, keep, True)
        lo = wilson(int(correct[keep].sum()), int(keep.sum()))[0]
        if correct[keep].any() and lo > best_lo:  # strictly: among equals the smallest t, which flags the fewest
            best, best_lo = t, lo
    if best is not None:
        return record(best, top >= best, False)
    return {"threshold": None, "accuracy_at_or_above": None, "accuracy_ci95": None, "target_met": False,
            "coverage": 0.0, "n": int(len(labels)), "accepted": 0}


@dataclass(frozen=True)
class UncertaintyRule:
    temperature: float = 1.0
    threshold: float | None = 0.5
    checks: PictureChecks = field(default_factory=PictureChecks)
    not_a_cell: tuple[int, ...] = ()  # class indices that are always flagged (rule step 4)
    n_classes: int | None = None      # the output's columns after the first n_classes are not logits (step 5)
    max_distance: float | None = None  # rule step 5; None: no distance check
    panel: tuple[int, ...] | None = None  # rule step 6: the class indices on the lab's panel; None: every class

    def with_panel(self, panel: tuple[int, ...] | None) -> "UncertaintyRule":
        """This rule on a panel (cellcore.panels.resolve_panel's indices; None: every class)."""
        return replace(self, panel=None if panel is None else tuple(int(i) for i in panel))

    def _scores(self, out: np.ndarray) -> np.ndarray:
        out = np.asarray(out)
        return out[..., :self.n_classes] if self.n_classes is not None else out  # drop the distance column

    def probabilities(self, out: np.ndarray, kind: str = "logits") -> np.ndarray:
        """A model's [C] or [C + 1] (or [N, ...]) output -> calibrated [C] / [N, C] probabilities (Core ML gives
        probabilities: their logarithms are logits up to a constant, so the same temperature applies). On a
        panel: a softmax over the panel's classes, the others exactly 0."""
        out = self._scores(out)
        logits = np.log(np.clip(out, 1e-12, 1.0)) if kind == "probabilities" else np.asarray(out, np.float64)
        if self.panel is not None:
            off = np.ones(logits.shape[-1], dtype=bool)
            off[list(self.panel)] = False
            logits = np.where(off, -np.inf, logits)  # exp(-inf) = 0: off-panel classes take no probability
        return softmax(logits, self.temperature)

    def off_panel(self, out: np.ndarray) -> np.ndarray | bool:
        """Rule step 6 alone: the model's most probable class over all its classes is off the panel ([N] bool
        for [N, ...] outputs); always False without a panel. The argmax of logits and of probabilities agree."""
        scores = self._scores(out)
        if self.panel is None:
            return np.zeros(scores.shape[:-1], dtype=bool) if scores.ndim > 1 else False
        off = ~np.isin(np.argmax(scores, axis=-1), list(self.panel))
        return off if scores.ndim > 1 else bool(off)

    def distances(self, out: np.ndarray) -> np.ndarray | None:
        """The feature distance column of a [C + 1] / [N, C + 1] output ([] / [N]); None if the output has none."""
        out = np.asarray(out)
        if self.n_classes is None or out.shape[-1] <= self.n_classes:
            return None
        return out[..., self.n_classes].astype(np.float64)

    def far(self, distance: float | None) -> bool:
        """Rule step 5 alone: the features lie farther from every training class than this file's max_distance."""
        return self.max_distance is not None and distance is not None and float(distance) > self.max_distance

    def uncertain(self, top_probability: float, problems: list[str] | tuple[str, ...] = (),
                  predicted: int | None = None, distance: float | None = None, off_panel: bool = False) -> bool:
        """predicted: the top class's index (rule step 4); None skips that step. distance: step 5. off_panel:
        step 6 (off_panel() of the model's output)."""
        return (bool(problems) or self.threshold is None or top_probability < self.threshold
                or (predicted is not None and int(predicted) in self.not_a_cell) or self.far(distance)
                or bool(off_panel))

    def flagged(self, probs: np.ndarray, problems: list[list[str]] | list[tuple[str, ...]],
                distances: np.ndarray | None = None, off_panel: np.ndarray | None = None) -> np.ndarray:
        """[N, C] calibrated probabilities + each picture's problems (+ [N] feature distances, + [N] off_panel)
        -> [N] bool."""
        ds = [None] * len(probs) if distances is None else list(distances)
        off = [False] * len(probs) if off_panel is None else list(off_panel)
        return np.array([self.uncertain(float(p.max()), pr, int(p.argmax()), d, o)
                         for p, pr, d, o in zip(probs, problems, ds, off)], dtype=bool).reshape(len(probs))

    def flagged_outputs(self, out: np.ndarray, problems: list[list[str]] | list[tuple[str, ...]],
                        kind: str = "logits") -> tuple[np.ndarray, np.ndarray]:
        """[N, C(+1)] model outputs + each picture's problems -> ([N, C] probabilities, [N] flagged): every
        step of the rule, as verification, the benchmarks and the app apply it."""
        probs = self.probabilities(out, kind)
        return probs, self.flagged(probs, problems, self.distances(out), self.off_panel(out))


def rule_for(manifest: dict, artifact_file: str | None = None, panel: str | None = None) -> UncertaintyRule:
    """The rule for one exported file, from manifest["uncertainty"] (old manifests: one threshold, T = 1), on
    `panel` (a cellcore.panels name or class list; None: every class; PanelError if it does not fit)."""
    return _rule_for(manifest, artifact_file).with_panel(resolve_panel(panel, list(manifest.get("classes") or [])))


def _rule_for(manifest: dict, artifact_file: str | None) -> UncertaintyRule:
    unc = manifest.get("uncertainty") or {}
    checks = PictureChecks.from_dict(unc.get("picture_checks"))
    classes = list(manifest.get("classes") or [])
    not_a_cell = tuple(classes.index(c) for c in unc.get("not_a_white_cell") or () if c in classes)
    n = len(classes) or None
    per = (unc.get("per_artifact") or {}).get(artifact_file or "", None)
    if per:
        return UncertaintyRule(float(per.get("temperature", 1.0)), per.get("threshold"), checks, not_a_cell, n,
                               per.get("max_distance"))
    dist = (unc.get("feature_distance") or {}).get("max_distance")
    return UncertaintyRule(float(unc.get("temperature", 1.0)), unc.get("threshold", 0.5), checks, not_a_cell, n, dist)
