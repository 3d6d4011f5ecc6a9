"""Makers of real-derived, unusual and broken image files for the app's input tests."""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def real_images(pbc_dev: Path, per_class: int) -> list[Path]:
    """The first `per_class` images (by name) of every class folder: deterministic, all classes."""
    out: list[Path] = []
    for folder in sorted(p for p in Path(pbc_dev).iterdir() if p.is_dir()):
        out += sorted(folder.glob("*.jpg"))[:per_class]
    return out


# ----------------------------------------------------------------------------- same pixels, other encodings

def as_gray(src: Path, dst: Path) -> Path:
    dst = dst.with_suffix(".png")
    Image.open(src).convert("L").save(dst)
    return dst


def as_rgba(src: Path, dst: Path) -> Path:
    im = Image.open(src).convert("RGBA")
    im.putalpha(Image.linear_gradient("L").resize(im.size))  # real transparency, must be dropped
    dst = dst.with_suffix(".png")
    im.save(dst)
    return dst


def as_palette(src: Path, dst: Path) -> Path:
    dst = dst.with_suffix(".png")
    Image.open(src).convert("P", palette=Image.ADAPTIVE, colors=64).save(dst)
    return dst


def as_gray_alpha(src: Path, dst: Path) -> Path:
    dst = dst.with_suffix(".png")
    Image.open(src).convert("LA").save(dst)
    return dst


def as_cmyk_jpeg(src: Path, dst: Path) -> Path:
    dst = dst.with_suffix(".jpg")
    Image.open(src).convert("CMYK").save(dst, quality=95)
    return dst


def as_bmp(src: Path, dst: Path) -> Path:
    dst = dst.with_suffix(".bmp")
    Image.open(src).convert("RGB").save(dst)
    return dst


def as_gray16_tiff(src: Path, dst: Path) -> Path:
    g = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257 + 3  # [H, W] uint16, full range
    dst = dst.with_suffix(".tif")
    Image.fromarray(g).save(dst)
    return dst


def as_rgb16_tiff(src: Path, dst: Path) -> Path:
    import tifffile

    rgb = np.asarray(Image.open(src).convert("RGB"), dtype=np.uint16) * 257  # [H, W, 3] uint16
    dst = dst.with_suffix(".tif")
    tifffile.imwrite(dst, rgb, photometric="rgb")
    return dst


ENCODINGS = {
    "grayscale": as_gray, "rgba": as_rgba, "palette": as_palette, "gray_alpha": as_gray_alpha,
    "cmyk_jpeg": as_cmyk_jpeg, "bmp": as_bmp, "gray16_tiff": as_gray16_tiff, "rgb16_tiff": as_rgb16_tiff,
}


# ----------------------------------------------------------------------------- broken or hostile files

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height but has no pixel data: Pillow reads the size from IHDR alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def huge(path: Path, size: int, fmt: str) -> Path:
    """A size x size photo (JPEG or grayscale PNG) with a dark 'cell' in the middle; cheap to encode."""
    mode = "L" if fmt == "PNG" else "RGB"
    im = Image.new(mode, (size, size), 200 if mode == "L" else (230, 200, 210))
    disk = Image.new(mode, (size // 4, size // 4), 60 if mode == "L" else (90, 40, 120))
    im.paste(disk, (size * 3 // 8, size * 3 // 8))
    if fmt == "PNG":
        im.save(path, compress_level=1)
    else:
        im.save(path, quality=70)
    return path


# ----------------------------------------------------------------------------- a field of several real cells

FIELD_SIZE = (1200, 900)
FIELD_BACKGROUND = (232, 206, 200)  # light pink, like a smear's background between the photos
FIELD_CELLS = (("lymphocyte", (80, 60)), ("neutrophil", (700, 120)), ("eosinophil", (380, 500)))


@dataclass(frozen=True)
class PastedCell:
    """One real pbc_dev photo pasted into a field, where it lies there (field pixels)."""

    cls: str
    source: Path
    left: int
    top: int
    width: int
    height: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.left + self.width / 2, self.top + self.height / 2)

    @property
    def square(self) -> tuple[int, int, int, int]:
        """The largest centred square of the pasted photo, in field pixels: what the photo alone is classified on."""
        side = min(self.width, self.height)
        left, top = self.left + (self.width - side) // 2, self.top + (self.height - side) // 2
        return (left, top, left + side, top + side)


def cell_field(pbc_dev: Path, path: Path, cells: tuple[tuple[str, tuple[int, int]], ...] = FIELD_CELLS,
               size: tuple[int, int] = FIELD_SIZE) -> tuple[Path, list[PastedCell]]:
    """A microscope field with several cells: the first photo of each class pasted at its (left, top).

    Saved losslessly (PNG), so the field holds exactly the decoded pixels of each photo.
    """
    field = Image.new("RGB", size, FIELD_BACKGROUND)
    pasted = []
    for cls, (left, top) in cells:
        source = sorted((Path(pbc_dev) / cls).glob("*.jpg"))[0]
        with Image.open(source) as im:
            rgb = im.convert("RGB")
        field.paste(rgb, (left, top))
        pasted.append(PastedCell(cls, source, left, top, *rgb.size))
    field.save(path)
    return path, pasted
