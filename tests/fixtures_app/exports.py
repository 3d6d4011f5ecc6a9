"""Helpers to find, copy and edit parts of an export folder (manifest.json + model files) in tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from collections.abc import Callable


def manifest_of(export: Path) -> dict:
    return json.loads((export / "manifest.json").read_text())


def artifact_file(export: Path, fmt: str, precision: str = "fp32") -> Path:
    """The file of the (format, precision) artifact the manifest lists."""
    for a in manifest_of(export)["artifacts"]:
        if a["format"] == fmt and a["precision"] == precision:
            return export / a["file"]
    raise LookupError(f"{export}: no {fmt} {precision} artifact")


def copy_export(src: Path, dst: Path, files: list[Path]) -> Path:
    """manifest.json plus only `files` (the rest stays listed but absent, as in a phone bundle)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "manifest.json", dst)
    for f in files:
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)
    return dst


def edit_manifest(export: Path, edit: Callable[[dict], None]) -> None:
    m = manifest_of(export)
    edit(m)
    (export / "manifest.json").write_text(json.dumps(m))
