"""The one definition of how a photo becomes model input (torch-free: the app imports it as is)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
from PIL import Image

# Policies the app knows how to apply; the name is part of the manifest contract.
RESIZE_POLICIES = ("center_square_crop_then_resize", "cell_square_crop_then_resize")
INTERPOLATIONS = {"bilinear": Image.BILINEAR}

# What the model does to its 0..1 input before the backbone (train.models.Classifier.normalise).
INPUT_NORMS = ("imagenet", "od_instance", "rgb_instance")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Photo -> [3, S, S] float32 in 0..1 (RGB); mean/std are applied *inside* the model.

    The crop is the largest centred square (cells are photographed centred, and a square
    keeps the aspect ratio) or, with `cell_square_crop_then_resize`, the square around the
    nucleus nearest the centre (`cell_box`), resized with Pillow's bilinear filter. Training,
    evaluation, export verification and the app all call exactly this code (the app builds it
    from the manifest; a test checks the two agree pixel for pixel on real images).
    """

    input_size: int
    resize: str = "center_square_crop_then_resize"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    value_range: tuple[float, float] = (0.0, 1.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    normalization_in_model: bool = field(default=True)
    # Which normalisation the model applies to its 0..1 input (train.models.INPUT_NORMS). Informative
    # for the app: it is inside every exported graph, so the app never applies it itself.
    input_norm: str = "imagenet"
    # cell_square_crop_then_resize: the nucleus extent covers this fraction of the square's side
    cell_fill: float = 0.55

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; valid: {', '.join(RESIZE_POLICIES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {self.input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        if not 0.1 <= self.cell_fill <= 1.0:
            raise ValueError(f"cell_fill must be in 0.1..1, got {self.cell_fill}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)

    def box_for(self, img: Image.Image) -> tuple[int, int, int, int]:
        """The square that becomes the model input, in the image's pixels (may reach past its edges)."""
        if self.resize == "cell_square_crop_then_resize":
            return cell_box(img, self.cell_fill)
        return self.crop_box(*img.size)

    def apply(self, img: Image.Image) -> Image.Image:
        """RGB PIL image of any size -> RGB PIL image [S, S]."""
        return crop_resize(img, self.box_for(img), self.input_size, INTERPOLATIONS[self.interpolation])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["value_range"] = list(self.mean), list(self.std), list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From a checkpoint's or manifest's dict; keys that are not fields (a manifest's app_steps) are ignored."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("mean", "std", "value_range"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int, resample: int) -> Image.Image:
    """Crop an integer box (edge pixels repeated where it reaches past the image) and resize to size x size."""
    w, h = img.size
    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        return img.resize((size, size), resample, box=box)
    pad = max(-left, -top, right - w, bottom - h)
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return Image.fromarray(arr).resize((size, size), resample, box=(left + pad, top + pad, right + pad, bottom + pad))


def cell_box(img: Image.Image, fill: float = 0.55, work: int = 96) -> tuple[int, int, int, int]:
    """The square centred on the stained nucleus nearest the centre, sized so the nucleus spans `fill` of it.

    Why: labs frame cells differently (PBC: the cell is about a third of a 360 px field; other labs'
    crops: 60-100% of the frame), and a network trained at one scale reads size as a class cue
    (a big cell is an immature granulocyte). Nuclei absorb red light strongly under every Romanowsky
    stain (optical density of the red channel ~1), while red cells, cytoplasm and yellow or white
    backgrounds hardly do, so the red-channel density finds the nucleus under any stain or lamp.
    Deterministic and torch-free: the app calls exactly this function.
    """
    w, h = img.size
    scale = work / max(w, h)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    red = np.asarray(small, dtype=np.float32)[:, :, 0]
    od = -np.log(np.maximum(red, 1.0) / 255.0)                   # [h', w'] red-channel optical density
    thr = max(0.3, 0.5 * float(np.percentile(od, 99.5)))
    ys, xs = np.nonzero(od > thr)
    sh, sw = od.shape
    # only the nucleus near the centre: neighbours at the field's edge do not count
    near = (ys - sh / 2) ** 2 + (xs - sw / 2) ** 2 <= (0.42 * min(sh, sw)) ** 2
    ys, xs = ys[near], xs[near]
    side_full = min(w, h)
    if len(ys) < 12:  # nothing stained near the centre: the plain centred square
        cx, cy, side = w / 2, h / 2, side_full
    else:
        y0, y1 = np.percentile(ys, [2, 98])
        x0, x1 = np.percentile(xs, [2, 98])
        cx, cy = (x0 + x1 + 1) / 2 / scale, (y0 + y1 + 1) / 2 / scale
        extent = max(x1 - x0 + 1, y1 - y0 + 1) / scale
        side = min(max(extent / fill, 0.2 * side_full), 1.6 * side_full)
    side_i = max(8, int(round(side)))
    left, top = int(round(cx - side_i / 2)), int(round(cy - side_i / 2))
    return (left, top, left + side_i, top + side_i)
