"""Is this a picture of a stained cell at all, and stained like the model's training pictures? Deterministic checks on the pixels, before any model runs.

A classifier trained on cells answers every picture with some cell class, often confidently (an
empty field came out as "platelet 99.5%"). These checks catch what no probability threshold can:
nothing stained in the field (an empty field, red cells only, text, a hand, a grayscale photo),
a picture too blurred to read, and a nucleus whose stain colour lies outside what the model was
trained on (another lab's stain: the model is confidently wrong there, README "Cells from other
labs"). They look at the largest centred square at a fixed 128 px, so their result does not depend
on the model's input size or crop policy; export, verification, the benchmarks and the app all call
this module.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from cellcore.imaging import BadImageError, decode

log = logging.getLogger(__name__)

ANALYSIS_SIZE = 128


@dataclass(frozen=True)
class PictureChecks:
    """Thresholds measured with `python -m benchmarks.noncell --measure FOLDER ...` (README, "Cells from other labs").

    min_stain: share of the field's pixels that look like a Romanowsky-stained nucleus (every
    pbc_dev image: >= 0.0029; empty fields, text and hands: 0). min_sharpness: mean |Laplacian|
    of the luminance over its standard deviation (pbc_dev >= 0.095; cross-lab crops 0.013-0.082;
    a cell blurred by a 10-16 px Gaussian: <= 0.030).
    stain_hue: (red lo, red hi, blue lo, blue hi) of the nucleus colour (`nucleus_hue`) seen in the
    run's training pictures, or None (no check). Fitted at export by `fit_stain_hue` on the training
    split; a fine-tuned run widens its parent's range with the new lab's cells.
    """

    min_stain: float = 0.002
    min_sharpness: float = 0.031
    stain_hue: tuple[float, float, float, float] | None = None

    def problems(self, rgb: Image.Image) -> list[str]:
        """Reasons this picture cannot be classified, [] if none. rgb: any size, 8-bit RGB."""
        a, od, stain = _analysis(rgb)
        out = []
        if stain.mean() < self.min_stain:
            out.append("no stained cell found in the picture")
        if _sharpness(a) < self.min_sharpness:
            out.append("picture too blurred")
        if self.stain_hue is not None and stain.any():
            r, b = _hue(od, stain)
            r_lo, r_hi, b_lo, b_hi = self.stain_hue
            if not (r_lo <= r <= r_hi and b_lo <= b <= b_hi):
                out.append(f"stain colour unlike the training pictures (nucleus red {r:.3f}, blue {b:.3f}; "
                           f"trained on {r_lo:.3f}..{r_hi:.3f}, {b_lo:.3f}..{b_hi:.3f}): fine-tune on this lab's cells")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stain_hue"] = None if self.stain_hue is None else [float(v) for v in self.stain_hue]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "PictureChecks":
        d = d or {}
        hue = d.get("stain_hue")
        if hue is not None and len(hue) != 4:
            raise ValueError(f"picture_checks.stain_hue must be [red lo, red hi, blue lo, blue hi], got {hue!r}")
        return cls(**{k: float(d[k]) for k in ("min_stain", "min_sharpness") if k in d},
                   stain_hue=None if hue is None else tuple(float(v) for v in hue))


def _analysis(rgb: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest centred square at 128 px: ([128, 128, 3] float32 0..255, its optical density, [128, 128] stain mask)."""
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    a = np.asarray(rgb.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BILINEAR, box=box), dtype=np.float32)
    od = -np.log(np.maximum(a, 1.0) / 255.0)  # [128, 128, 3] optical density per channel
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    # A nucleus under any Romanowsky stain absorbs green most (purple to red-violet), and red strongly;
    # red cells absorb little red, skin and yellow casts absorb blue most, print absorbs all alike.
    stain = (r > 0.45) & (g >= r) & (g >= b) & (g - np.minimum(r, b) > 0.2)
    return a, od, stain


def _sharpness(a: np.ndarray) -> float:
    lum = a.mean(axis=2)
    lap = np.abs(4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:])
    return float(lap.mean() / (lum.std() + 1.0))


def _hue(od: np.ndarray, stain: np.ndarray) -> tuple[float, float]:
    # The stained pixels' mean optical-density colour as a unit vector: its red and blue parts say the
    # dye's hue (PBC's blue-violet nuclei: red 0.39-0.56; another lab's red-violet ones: median 0.34),
    # independent of how dark the stain is. A lamp's colour cast is mostly in the background, not here.
    v = od[stain].mean(axis=0)
    v = v / (np.linalg.norm(v) + 1e-6)
    return float(v[0]), float(v[2])


def measure(rgb: Image.Image) -> tuple[float, float]:
    """(stain fraction, sharpness) of the largest centred square at 128 px."""
    a, _, stain = _analysis(rgb)
    return float(stain.mean()), _sharpness(a)


def nucleus_hue(rgb: Image.Image) -> tuple[float, float] | None:
    """(red, blue) parts of the unit optical-density colour of the picture's stained pixels; None if none are."""
    _, od, stain = _analysis(rgb)
    return _hue(od, stain) if stain.any() else None


def fit_stain_hue(hues: np.ndarray, quantile: float = 0.001, margin: float = 0.1) -> tuple[float, float, float, float]:
    """[N, 2] training pictures' (red, blue) nucleus colours -> the range a picture must fall in.

    Each part's 0.1st..99.9th percentile, widened by 10% of its span on both sides: on runs/odbg80 this
    flags none of the 1,058 PBC validation and test pictures and 80% of crosslab_dev (README).
    """
    hues = np.asarray(hues, dtype=np.float64).reshape(-1, 2)
    if len(hues) == 0:
        raise ValueError("no stained training pictures to fit the stain colour range on")
    lo, hi = np.quantile(hues, quantile, axis=0), np.quantile(hues, 1 - quantile, axis=0)
    span = hi - lo
    lo, hi = lo - margin * span, hi + margin * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def union_stain_hue(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> tuple[float, float, float, float] | None:
    """The smallest range holding both (a fine-tuned model knows its parent's stain and the new lab's)."""
    if a is None or b is None:
        return None if a is None and b is None else tuple(a or b)
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def stain_hue_range(paths: list, quantile: float = 0.001, margin: float = 0.1) -> tuple[float, float, float, float] | None:
    """Fit the stain colour range on these photos (a run's training split); None if none has a stained nucleus.

    Decoded as the app decodes; an unreadable file is skipped with a warning (training already reported it).
    """
    hues = []
    for p in paths:
        try:
            h = nucleus_hue(decode(p).rgb)
        except BadImageError as exc:
            log.warning("stain colour range: skipped %s: %s", p, exc.reason)
            continue
        if h is not None:
            hues.append(h)
    if not hues:
        return None
    out = fit_stain_hue(np.asarray(hues), quantile, margin)
    log.info("stain colour range of %d training photos: nucleus red %.3f..%.3f, blue %.3f..%.3f", len(hues), *out)
    return out
