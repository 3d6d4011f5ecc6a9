"""Exceptions whose message is written for the person using the app (shown as is in the UI and CLI)."""
from __future__ import annotations

from pathlib import Path


class AppError(Exception):
    """Base class: str(exc) is a complete sentence for the user."""


class BadImageError(AppError):
    """One photo that cannot be classified; carries the path and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{Path(path).name}: {reason}" if str(path) else reason)


class ModelError(AppError):
    """The model folder cannot be used (manifest, files, runtime); classification is impossible."""


class ManifestError(ModelError):
    """manifest.json missing, unreadable, of another schema version, or inconsistent."""


class ModelIntegrityError(ModelError):
    """A model file is missing or its sha256 differs from the manifest's: refused, never loaded."""


class RuntimeUnavailableError(ModelError):
    """No inference engine on this platform can run the requested model format."""


class InferenceError(AppError):
    """The runtime failed while running the model on one input."""
