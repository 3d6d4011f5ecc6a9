"""The one definition of how a photo becomes model input; travels in checkpoints and the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from PIL import Image

# Policies the app knows how to apply. Only one today; the name is part of the manifest contract.
RESIZE_POLICIES = ("center_square_crop_then_resize",)
INTERPOLATIONS = {"bilinear": Image.BILINEAR}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Photo -> [3, S, S] float32 in 0..1 (RGB); mean/std are applied *inside* the model.

    The crop is the largest centred square (cells are photographed centred, and a square
    keeps the aspect ratio), resized with Pillow's bilinear filter. Training, evaluation,
    export verification and the app all call exactly this (the app re-implements it
    torch-free from the manifest; a test checks the two agree pixel for pixel).
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

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; valid: {', '.join(RESIZE_POLICIES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)

    def apply(self, img: Image.Image) -> Image.Image:
        """RGB PIL image of any size -> RGB PIL image [S, S]."""
        return img.resize(
            (self.input_size, self.input_size),
            INTERPOLATIONS[self.interpolation],
            box=self.crop_box(*img.size),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["value_range"] = list(self.mean), list(self.std), list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        for k in ("mean", "std", "value_range"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)
