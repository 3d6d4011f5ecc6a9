"""Photo -> model input without torch: the one image decoder (training, export, benchmarks, app), then preprocessing."""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellcore.preprocess import Preprocessing

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_SIDE = 32  # the smallest input size the training code accepts; anything smaller is not a cell photo
MAX_DECODE_PIXELS = 24_000_000  # above this, decode downscaled (JPEG draft / reduce) instead of in full
HARD_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses to open anything larger (decompression bomb)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


class BadImageError(ValueError):
    """One photo that cannot be decoded; carries the path and a reason written for the person who gave it.

    Training skips and reports such files; the app shows the message as is.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{Path(path).name}: {reason}" if str(path) else reason)


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit RGB photo ready to crop; `scale` < 1 when a huge photo was decoded downscaled."""

    rgb: Image.Image
    original_size: tuple[int, int]  # (width, height) of the file as stored
    scale: float  # rgb.width / original width

    def to_original(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """A box in `rgb` pixels -> the same box in the original file's pixels."""
        return tuple(v / self.scale for v in box)  # type: ignore[return-value]


def _to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    """Any numeric HxW, HxWx1/3/4 array (8/16-bit, float) -> HxWx3 uint8 (same rules as training)."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        hi = 1.0 if a.max() <= 1.0 else (65535.0 if a.max() > 255 else 255.0)
        arr = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[:, :, :3]  # drop alpha: slide scans have no meaningful transparency
    else:
        raise ValueError(f"unsupported pixel layout {arr.shape}")
    return np.ascontiguousarray(arr)


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    """A loaded Pillow image of any mode -> 8-bit RGB (16-bit >> 8, alpha dropped, grey repeated)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_to_uint8_rgb(np.asarray(im)))
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "P", "PA"):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _decode_tiff_with_tifffile(path: Path, reason: Exception) -> Image.Image:
    """Pillow cannot read 16-bit-per-channel RGB TIFFs; tifffile (optional on phones) can."""
    try:
        import tifffile
    except ImportError as exc:
        raise BadImageError(path, "this TIFF (probably 16-bit RGB) needs the 'tifffile' package, "
                                  "which is not installed") from exc
    try:
        arr = tifffile.imread(path)
    except (ValueError, OSError, TypeError, KeyError, IndexError, MemoryError) as exc:
        raise BadImageError(path, f"cannot decode TIFF ({exc}; Pillow said: {reason})") from exc
    if arr.size == 0:
        raise BadImageError(path, f"cannot decode TIFF (no pixel data; Pillow said: {reason})")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, 2)  # planar (C, H, W) storage
    try:
        return Image.fromarray(_to_uint8_rgb(arr))
    except (ValueError, TypeError) as exc:
        raise BadImageError(path, f"cannot decode TIFF ({exc})") from exc


def decode(path: Path | str) -> DecodedImage:
    """Decode any supported photo to 8-bit RGB, or raise BadImageError with a message for the user.

    Training (train/data.py load_rgb), verification and the app all decode through here. Photos above
    MAX_DECODE_PIXELS are decoded at 1/2, 1/4 or 1/8 size (Image.draft for JPEG, reduce()
    otherwise) so a 10000x10000 picture cannot exhaust a phone's memory.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    if path.is_dir():
        raise BadImageError(path, "is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"image too large to open safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _checked(path, _decode_tiff_with_tifffile(path, exc), None)
        raise BadImageError(path, "not an image, or a format this app cannot read "
                                  "(use JPEG, PNG, BMP or TIFF)") from exc
    except OSError as exc:
        raise BadImageError(path, f"cannot read file ({exc})") from exc
    with im:
        original = im.size
        w, h = original
        if w * h > HARD_MAX_PIXELS:
            raise BadImageError(path, f"image too large ({w}x{h} px, {w * h / 1e6:.0f} MP; "
                                      f"the limit is {HARD_MAX_PIXELS / 1e6:.0f} MP)")
        factor = _reduce_factor(w, h)
        try:
            if factor > 1 and im.format == "JPEG":
                # [H, W] -> decoded by libjpeg's DCT scaling at about 1/factor: never holds the full image
                im.draft(im.mode, (math.ceil(w / factor), math.ceil(h / factor)))
                log.info("%s: %dx%d px decoded at %dx%d (draft)", path.name, w, h, *im.size)
            im.load()  # forces the full decode: truncated files fail here, not later
            rgb = _pil_to_rgb(im)
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            if path.suffix.lower() in (".tif", ".tiff"):
                return _checked(path, _decode_tiff_with_tifffile(path, exc), None)
            if "truncated" in str(exc).lower():
                raise BadImageError(path, "image file is damaged or incomplete (truncated)") from exc
            raise BadImageError(path, f"cannot decode image ({exc})") from exc
    return _checked(path, rgb, original)


def _reduce_factor(w: int, h: int) -> int:
    """Smallest power of two that brings w*h under MAX_DECODE_PIXELS (1 for ordinary photos)."""
    factor = 1
    while (w / factor) * (h / factor) > MAX_DECODE_PIXELS and factor < 64:
        factor *= 2
    return factor


def _checked(path: Path, rgb: Image.Image, original: tuple[int, int] | None) -> DecodedImage:
    original = original or rgb.size
    w, h = rgb.size
    if min(original) < MIN_SIDE:
        raise BadImageError(path, f"image too small ({original[0]}x{original[1]} px): a cell photo needs at "
                                  f"least {MIN_SIDE} px on its short side")
    factor = _reduce_factor(w, h)
    if factor > 1:  # formats without draft support: decoded in full, now shrink before anything else
        rgb = rgb.reduce(factor)
        log.info("%s: %dx%d px reduced by %d to %dx%d", path.name, w, h, factor, *rgb.size)
    return DecodedImage(rgb=rgb, original_size=original, scale=rgb.width / original[0])


def to_input(decoded: DecodedImage | Image.Image, prep: Preprocessing | int) -> np.ndarray:
    """8-bit RGB photo -> [1, 3, S, S] float32 in 0..1 (no mean/std: the model normalises).

    `prep` is the manifest's preprocessing (cellcore, the very code training ran); a bare size
    means the classic largest-centred-square policy.
    """
    rgb = decoded.rgb if isinstance(decoded, DecodedImage) else decoded
    prep = Preprocessing(prep) if isinstance(prep, int) else prep
    square = prep.apply(rgb)  # [S, S] RGB uint8
    hwc = np.asarray(square, dtype=np.uint8).astype(np.float32) / np.float32(255.0)  # [S, S, 3] float32 in 0..1
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)[None])  # [1, 3, S, S] float32 in 0..1


def display_copy(decoded: DecodedImage, max_side: int = 1024) -> Image.Image:
    """A small RGB copy for the screen (the UI never decodes files itself)."""
    rgb = decoded.rgb
    if max(rgb.size) <= max_side:
        return rgb
    copy = rgb.copy()
    copy.thumbnail((max_side, max_side), Image.BILINEAR)
    return copy


def list_images(folder: Path | str) -> list[Path]:
    """Image files directly in a folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
