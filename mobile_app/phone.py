"""Phone platform details the UI needs, Kivy-free: run-time permissions and what a platform call can raise.

Android 6+ grants "dangerous" permissions only when the app asks while running; the manifest entry in
buildozer.spec alone is not enough. Android 13 (API 33) split storage access: photos need
READ_MEDIA_IMAGES there, READ_EXTERNAL_STORAGE before (where READ_MEDIA_IMAGES does not exist).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CAMERA = "android.permission.CAMERA"
READ_MEDIA_IMAGES = "android.permission.READ_MEDIA_IMAGES"
READ_EXTERNAL_STORAGE = "android.permission.READ_EXTERNAL_STORAGE"
API_TIRAMISU = 33  # Android 13

APP_NAME = "Cell classifier"  # buildozer.spec's title: what Settings > Apps lists


def photo_permissions(sdk_int: int) -> list[str]:
    """What reading photos from the gallery needs on this API level (0 = unknown: ask for the old one)."""
    return [READ_MEDIA_IMAGES] if sdk_int >= API_TIRAMISU else [READ_EXTERNAL_STORAGE]


def refused_message(permissions: list[str]) -> str:
    """A plain sentence: which permission was refused and where the user can allow it."""
    if CAMERA in permissions:
        what, setting = "use the camera", "Camera"
    else:
        what, setting = "open photos", "Photos and videos (or Storage)"
    return (f"Permission refused: the app cannot {what}. To allow it, open Settings > Apps > {APP_NAME} > "
            f"Permissions > {setting} > Allow, then try again.")


def platform_errors() -> tuple[type[BaseException], ...]:
    """What a plyer / android / pyjnius call can raise that must end in a message, never a crash.

    NotImplementedError: plyer has no backend here; OSError: files; jnius.JavaException: the Java side
    threw (a missing activity, a SecurityException, a FileUriExposedException from the camera intent, ...).
    """
    errors: tuple[type[BaseException], ...] = (NotImplementedError, OSError)
    try:
        from jnius import JavaException
    except ImportError:  # desktop, iOS: no Java
        return errors
    return (*errors, JavaException)
