"""Is this a picture of a stained cell at all? Deterministic checks on the pixels, before any model runs.

A classifier trained on cells answers every picture with some cell class, often confidently (an
empty field came out as "platelet 99.5%"). These checks catch what no probability threshold can:
nothing stained in the field (an empty field, red cells only, text, a hand, a grayscale photo)
and a picture too blurred to read. They look at the largest centred square at a fixed 128 px, so
their result does not depend on the model's input size or crop policy; training, verification,
the benchmarks and the app all call this function.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

ANALYSIS_SIZE = 128


@dataclass(frozen=True)
class PictureChecks:
    """Thresholds measured with `python -m benchmarks.noncell --measure FOLDER ...` (README, "Cells from other labs").

    min_stain: share of the field's pixels that look like a Romanowsky-stained nucleus (every
    pbc_dev image: >= 0.0029; empty fields, text and hands: 0). min_sharpness: mean |Laplacian|
    of the luminance over its standard deviation (pbc_dev >= 0.095; cross-lab crops 0.013-0.082;
    a cell blurred by a 10-16 px Gaussian: <= 0.030).
    """

    min_stain: float = 0.002
    min_sharpness: float = 0.031

    def problems(self, rgb: Image.Image) -> list[str]:
        """Reasons this picture cannot be classified, [] if none. rgb: any size, 8-bit RGB."""
        stain, sharp = measure(rgb)
        out = []
        if stain < self.min_stain:
            out.append("no stained cell found in the picture")
        if sharp < self.min_sharpness:
            out.append("picture too blurred")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PictureChecks":
        return cls(**{k: float(v) for k, v in (d or {}).items() if k in ("min_stain", "min_sharpness")})


def measure(rgb: Image.Image) -> tuple[float, float]:
    """(stain fraction, sharpness) of the largest centred square at 128 px."""
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    a = np.asarray(rgb.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BILINEAR, box=box), dtype=np.float32)
    od = -np.log(np.maximum(a, 1.0) / 255.0)  # [128, 128, 3] optical density per channel
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    # A nucleus under any Romanowsky stain absorbs green most (purple to red-violet), and red strongly;
    # red cells absorb little red, skin and yellow casts absorb blue most, print absorbs all alike.
    stain = (r > 0.45) & (g >= r) & (g >= b) & (g - np.minimum(r, b) > 0.2)
    lum = a.mean(axis=2)
    lap = np.abs(4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:])
    return float(stain.mean()), float(lap.mean() / (lum.std() + 1.0))
