"""Exceptions whose message is written for the person using the app (shown as is in the UI and CLI)."""
from __future__ import annotations


class AppError(Exception):
    """Base class: str(exc) is a complete sentence for the user."""


# One photo that cannot be decoded: raised by the shared decoder (cellcore.imaging), so training and the
# app report a bad file the same way. Its message, too, is written for the user.
from cellcore.imaging import BadImageError  # noqa: E402

USER_ERRORS = (AppError, BadImageError)  # str(exc) is a sentence for the user: show it, no traceback


class ModelError(AppError):
    """The model folder cannot be used (manifest, files, runtime); classification is impossible."""


class ManifestError(ModelError):
    """manifest.json missing, unreadable, of another schema version, or inconsistent."""


class ModelIntegrityError(ModelError):
    """A model file is missing or its sha256 differs from the manifest's: refused, never loaded."""


class RuntimeUnavailableError(ModelError):
    """No inference engine on this platform can run the requested model format."""


class PanelChoiceError(ModelError):
    """The panel asked for (cellcore.panels) names classes the model does not know."""


class InferenceError(AppError):
    """The runtime failed while running the model on one input."""


class NoModelError(ManifestError):
    """No model folder was given and the app's shipped model bundle is missing."""


class BoxError(AppError):
    """The square asked for does not fit the photo (its centre outside it, or a size that is not a number)."""
