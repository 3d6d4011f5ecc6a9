"""The one definition of how a photo becomes model input (torch-free: the app imports it as is)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from PIL import Image

# Policies the app knows how to apply; the name is part of the manifest contract.
RESIZE_POLICIES = ("center_square_crop_then_resize", "cell_square_crop_then_resize")
INTERPOLATIONS = {"bilinear": Image.BILINEAR}

# What the model does to its 0..1 input before the backbone (train.models.Classifier.normalise).
INPUT_NORMS = ("imagenet", "od_instance", "rgb_instance", "od_background", "od_gray", "od_aligned", "od_sharp")

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
    # cell_square_crop_then_resize: the square is at least this share of the photo's short side, so a
    # small stained object (a platelet clump, a pyknotic nucleus) is not blown up to a white cell's size
    cell_min_side: float = 0.2
    # cell_square_crop_then_resize: the square is at most this share of the photo's short side. 1.6 (the
    # default, what every manifest before this field meant) lets a big nucleus in a tight crop frame a square
    # past the photo's border, filled by repeating the edge pixels: streaks no PBC field ever shows. 1.0 keeps
    # the square within the photo's short side (the crosslab preset).
    cell_max_side: float = 1.6

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; valid: {', '.join(RESIZE_POLICIES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {self.input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        if not 0.1 <= self.cell_fill <= 1.0:
            raise ValueError(f"cell_fill must be in 0.1..1, got {self.cell_fill}")
        if not 0.05 <= self.cell_min_side <= 1.0:
            raise ValueError(f"cell_min_side must be in 0.05..1, got {self.cell_min_side}")
        if not max(self.cell_min_side, 0.5) <= self.cell_max_side <= 1.6:
            raise ValueError(f"cell_max_side must be in max(cell_min_side, 0.5)..1.6, got {self.cell_max_side}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)

    def box_for(self, img: Image.Image) -> tuple[int, int, int, int]:
        """The square that becomes the model input, in the image's pixels (may reach past its edges)."""
        if self.resize == "cell_square_crop_then_resize":
            return cell_box(img, self.cell_fill, min_side=self.cell_min_side, max_side=self.cell_max_side)
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


def cell_box(img: Image.Image, fill: float = 0.55, work: int = 96, min_side: float = 0.2,
             max_side: float = 1.6) -> tuple[int, int, int, int]:
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
        side = min(max(extent / fill, min_side * side_full), max_side * side_full)
    side_i = max(8, int(round(side)))
    left, top = int(round(cx - side_i / 2)), int(round(cy - side_i / 2))
    return (left, top, left + side_i, top + side_i)


# ----------------------------------------------------------------------------- a square the user picks in a photo

# (centre x, centre y, side) in an image's pixels: the square a user picked around one cell of a field.
Box = tuple[float, float, float]

MIN_BOX_SIDE = 16  # px of the decoded photo: a smaller square holds no cell worth classifying
# The nucleus spans this share of the suggested square's side: the median share of the 360 px field in
# pbc_dev (cell_box extents, measured per class: 0.20 erythroblast .. 0.37 monocyte), so a suggested
# square frames a cell about as the training photos do.
PICK_FILL = 0.31
PICK_WORK = 384  # the suggestion looks at the photo at most this many pixels wide
LOBE_REACH = 1 / 3  # blobs this share of the first blob's extent apart are lobes of one nucleus


def square_bounds(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The integer square (left, top, right, bottom) a box covers in a width x height image.

    A square that runs past an edge is moved back inside (and, larger than the image's short side,
    shrunk to it) rather than padded: the model then sees only real pixels, never the repeated edge
    rows that no training photo of a field shows, and the square drawn for the user is exactly the
    one classified. Sides under MIN_BOX_SIDE grow to it.
    """
    cx, cy, side = (float(v) for v in box)
    if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(side)) or side <= 0:
        raise ValueError(f"a box needs a finite centre and a positive side, got {box}")
    s = min(max(int(math.floor(side + 0.5)), MIN_BOX_SIDE), width, height)
    left = min(max(int(math.floor(cx - s / 2 + 0.5)), 0), width - s)
    top = min(max(int(math.floor(cy - s / 2 + 0.5)), 0), height - s)
    return (left, top, left + s, top + s)


def box_from_bounds(bounds: tuple[float, float, float, float]) -> Box:
    """(left, top, right, bottom) of a square -> (centre x, centre y, side)."""
    left, top, right, bottom = bounds
    return ((left + right) / 2, (top + bottom) / 2, right - left)


def crop_square(rgb: Image.Image, box: Box) -> Image.Image:
    """The pixels inside a box (moved inside the image where it runs off, see square_bounds): a square image.

    Preprocessing.apply() then treats the cut-out exactly as a whole photo, so the model sees a picked
    cell framed as training framed its photos.
    """
    return rgb.crop(square_bounds(box, *rgb.size))


def suggest_box(rgb: Image.Image, x: float, y: float, fill: float = PICK_FILL, work: int = PICK_WORK) -> Box:
    """The square for the cell a user tapped at (x, y): centred on its nucleus, the nucleus spanning `fill`.

    The nucleus is found as cell_box finds it (red-channel optical density: any Romanowsky stain),
    in the photo scaled to at most `work` px: the stained blob nearest the tap (within a quarter of
    the photo), with the blobs that lie within a third of its extent of it (the lobes of a
    segmented nucleus). Specks under 2% of the largest blob's area are ignored. With nothing
    stained near the tap the square is centred on the tap with half the photo's short side.
    The side is at most the photo's short side; the square may still reach past an edge, which
    square_bounds moves inside. Deterministic, torch-free: the UI and `classify --box` call it.
    """
    w, h = rgb.size
    scale = min(1.0, work / max(w, h))
    small = rgb
    if scale < 1:
        reduced = rgb.reduce(max(1, int(1 / scale) // 2))  # a fast box shrink first: a 12 MP photo in ~50 ms
        small = reduced.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    red = np.asarray(small, dtype=np.float32)[:, :, 0]
    od = -np.log(np.maximum(red, 1.0) / 255.0)  # [h', w'] red-channel optical density
    radius = 0.25 * max(od.shape)
    tx, ty = x * scale, y * scale
    # stained: darker than half the darkest nucleus near the tap. Local, unlike cell_box's percentile:
    # a field holds cells of every shade, and how much background it shows would move a percentile.
    window = od[max(0, int(ty - radius)):max(1, int(ty + radius) + 1),
                max(0, int(tx - radius)):max(1, int(tx + radius) + 1)]
    peak = float(_box_mean(window, 1).max()) if window.size else 0.0  # 3x3 mean: a noisy pixel is no nucleus
    stained = od > max(0.3, 0.5 * peak)
    blobs = _Blobs(_dilate(stained, 1), stained)  # closed by 1 px: a grainy nucleus stays one blob
    seed = blobs.nearest(tx, ty, radius)
    if seed is None:
        return (float(x), float(y), min(w, h) / 2)
    ys, xs = blobs.group(seed)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    extent = max(x1 - x0 + 1, y1 - y0 + 1) / scale
    side = min(max(extent / fill, MIN_BOX_SIDE), min(w, h))
    return (float(x0 + x1 + 1) / 2 / scale, float(y0 + y1 + 1) / 2 / scale, float(side))


def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """[H, W] sums over the (2r+1)^2 square around each pixel (cut at the edges), through an integral image."""
    h, w = a.shape
    ii = np.zeros((h + 1, w + 1), np.float64 if a.dtype.kind == "f" else np.int64)
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    return ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]


def _box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """[H, W] float mean over the (2r+1)^2 square around each pixel (cut at the edges)."""
    ones = np.ones(a.shape, dtype=np.int64)
    return _box_sum(a.astype(np.float64), r) / _box_sum(ones, r)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """[H, W] bool grown by a (2r+1)^2 square (the cost does not grow with r)."""
    return _box_sum(mask.astype(np.int64), r) > 0 if r > 0 else mask


class _Blobs:
    """8-connected blobs of a mask, labelled by horizontal runs (Python loops over runs, not pixels).

    `stained` is the mask before closing: a blob's area and extent count only its stained pixels.
    """

    def __init__(self, mask: np.ndarray, stained: np.ndarray):
        h, _ = mask.shape
        edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        rows, starts = np.nonzero(edges == 1)
        _, ends = np.nonzero(edges == -1)  # exclusive; same row-major order as the starts
        parent = list(range(len(rows)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        bounds = np.searchsorted(rows, np.arange(h + 1))
        for r in range(h - 1):  # runs of neighbouring rows that touch (diagonals too) are one blob
            i, i_end, j, j_end = bounds[r], bounds[r + 1], bounds[r + 1], bounds[r + 2]
            while i < i_end and j < j_end:
                if starts[j] <= ends[i] and ends[j] >= starts[i]:
                    parent[find(i)] = find(j)
                if ends[i] < ends[j]:
                    i += 1
                else:
                    j += 1
        roots = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
        _, run_label = np.unique(roots, return_inverse=True)
        lengths = ends - starts
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        ys = np.repeat(rows, lengths)
        xs = np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) - first)
        label = np.repeat(run_label.reshape(-1), lengths)
        on = stained[ys, xs]
        self.shape = mask.shape
        self.ys, self.xs, self.label = ys[on], xs[on], label[on]  # every stained pixel and its blob
        self.n = int(run_label.max()) + 1 if len(rows) else 0
        self.area = np.bincount(self.label, minlength=self.n)
        # specks (dust, noise, stain precipitate) next to the cell must not take the square
        self.kept = self.area >= max(4, 0.02 * float(self.area.max(initial=0)))

    def nearest(self, x: float, y: float, radius: float) -> int | None:
        """The blob with a pixel nearest (x, y), within `radius`; None if there is none."""
        d2 = (self.xs + 0.5 - x) ** 2 + (self.ys + 0.5 - y) ** 2
        best = np.full(self.n, np.inf)
        np.minimum.at(best, self.label, d2)
        best[~self.kept] = np.inf
        seed = int(np.argmin(best)) if self.n else 0
        return seed if self.n and best[seed] <= radius ** 2 else None

    def group(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(ys, xs) of the seed blob and of the blobs within a third of its extent of it, joined until none
        is left: the lobes of one segmented nucleus, not the neighbouring cell."""
        inside = self.label == seed
        reach = max(1, int(round((max(np.ptp(self.xs[inside]), np.ptp(self.ys[inside])) + 1) * LOBE_REACH)))
        members = np.zeros(self.n, dtype=bool)
        members[seed] = True
        for _ in range(8):
            mine = members[self.label]
            grown = np.zeros(self.shape, dtype=bool)
            grown[self.ys[mine], self.xs[mine]] = True
            near = _dilate(grown, reach)[self.ys, self.xs]
            hit = (np.bincount(self.label, weights=near, minlength=self.n) > 0) & self.kept & ~members
            if not hit.any():
                break
            members |= hit
        mine = members[self.label]
        return self.ys[mine], self.xs[mine]
