"""Atomic file writes and file hashes: the one implementation training, export, benchmarks and the app share."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(fh) on a temp file beside path, fsync, rename: a crash or kill leaves the old file or the new one.

    The temp name carries the pid and thread so two writers never share one (the app's autosave thread and
    the UI may write the same count).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    """UTF-8, newlines as given (CSV writers pass \\r\\n themselves)."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def sha256_of(path: Path | str) -> str:
    """sha256 of a file, or of a directory's files (a Core ML .mlpackage is a folder) in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_of(path: Path | str) -> int:
    """Bytes of a file, or of all files under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
