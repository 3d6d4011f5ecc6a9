"""Phone entry point (buildozer and kivy-ios start main.py): this folder becomes the `mobile_app` package."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _register_package() -> None:
    """On a phone this folder is the app root, not a package: import it as `mobile_app` all the same."""
    if "mobile_app" in sys.modules:
        return
    here = Path(__file__).resolve().parent
    init = next((here / n for n in ("__init__.py", "__init__.pyc") if (here / n).exists()), None)
    if init is None:
        raise ImportError(f"{here} holds no mobile_app package (__init__.py missing)")
    spec = importlib.util.spec_from_file_location("mobile_app", init, submodule_search_locations=[str(here)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the mobile_app package from {here}")
    # the shared preprocessing package, vendored into this folder by `python -m mobile_app bundle`
    if importlib.util.find_spec("cellcore") is None:
        sys.path.insert(0, str(here))
    module = importlib.util.module_from_spec(spec)
    sys.modules["mobile_app"] = module
    spec.loader.exec_module(module)


def main() -> int:
    _register_package()
    from mobile_app.cli import main as cli_main

    return cli_main(sys.argv[1:] or ["run"])


if __name__ == "__main__":
    raise SystemExit(main())
