"""Command line: `classify` (headless, the UI's own code path), `run` (the UI) and `bundle` (model -> app assets)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

from mobile_app.errors import USER_ERRORS, BadImageError, BoxError, InferenceError, ModelError, NoModelError
from mobile_app.modelcard import MODEL_CARD_NAME, model_card

log = logging.getLogger(__name__)

ASSETS_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "model"
FORMAT_CHOICES = ("onnx", "executorch", "coreml")


def default_model_dir() -> Path:
    """$CELLVIT_MODEL_DIR, else the model bundled into the app (mobile_app/assets/model)."""
    env = os.environ.get("CELLVIT_MODEL_DIR")
    return Path(env) if env else ASSETS_MODEL_DIR


def resolve_model_dir(model_dir: Path | None) -> Path:
    """--model-dir when given (it always wins), else the default; a missing default says how to get a model."""
    if model_dir is not None:
        return model_dir
    path = default_model_dir()
    if not (path / "manifest.json").is_file():
        where = "$CELLVIT_MODEL_DIR" if os.environ.get("CELLVIT_MODEL_DIR") else "the app's model bundle"
        raise NoModelError(
            f"no model: {where} {path} holds no manifest.json. The shipped model comes with the repository: "
            f"restore it with `git checkout -- mobile_app/assets/model`, or rebuild it with `make release-model`; "
            f"or use your own: "
            f"`make train export RUN=NAME`, then `--model-dir runs/NAME/export` (`make app RUN=NAME`), or "
            f"`python -m mobile_app bundle --model-dir runs/NAME/export` to make it the app's bundle.")
    return path


def parse_box(text: str) -> tuple[float, float, float | None]:
    """--box x,y[,size] in the photo's pixels as stored -> (x, y, size or None for the suggested size)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values) or \
            (len(values) == 3 and values[2] <= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give x,y or x,y,size in pixels of the photo as stored "
                                         f"(size > 0; leave it out for the suggested one)")
    return (values[0], values[1], values[2] if len(values) == 3 else None)


def format_box(box: tuple[float, float, float]) -> str:
    """(x, y, size) -> 'x,y,size' with whole pixels printed without decimals."""
    return ",".join(f"{v:.1f}".removesuffix(".0") for v in box)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mobile_app",
                                description="Blood / bone-marrow cell classifier (research use only).")
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("classify", help="classify photos without a window; one line per photo")
    c.add_argument("images", nargs="+", type=Path, help="image files, or folders of images")
    c.add_argument("--model-dir", type=Path, default=None, help="export folder with manifest.json")
    c.add_argument("--format", choices=FORMAT_CHOICES, default=None,
                   help="model format (default: the best one this device runs)")
    c.add_argument("--json", action="store_true", help="print one JSON object per photo instead of text")
    c.add_argument("--box", type=parse_box, default=None, metavar="X,Y[,SIZE]",
                   help="classify the square centred at X,Y with side SIZE (pixels of the photo as stored) "
                        "instead of the whole photo; without SIZE, as a tap in the app: the square centres "
                        "on the stained cell nearest X,Y with the suggested size")
    c.add_argument("--panel", default=None, help="the classes this lab's slides can show, as in the app: wbc5 (the "
                   "five-part differential), wbc6 (+ immature granulocytes), all, or a comma-separated class list; "
                   "answers are the panel's most probable class and a first answer off the panel is flagged")

    r = sub.add_parser("run", help="start the app window (the default)")
    r.add_argument("--model-dir", type=Path, default=None, help="export folder with manifest.json")
    r.add_argument("--format", choices=FORMAT_CHOICES, default=None)
    r.add_argument("--data-dir", type=Path, default=None, help="where the differential count is kept")
    r.add_argument("--panel", default=None, help="start on this panel (as classify --panel; changeable on the "
                   "About screen; default: the last one chosen, else every class)")
    r.add_argument("--script", type=Path, default=None, help="JSON list of UI steps to play (tests, demos)")
    r.add_argument("--result", type=Path, default=None, help="with --script: write the outcome JSON here")

    b = sub.add_parser("bundle", help="copy manifest + one verified model into the app's assets for a phone build")
    b.add_argument("--model-dir", type=Path, required=True, help="export folder with manifest.json")
    b.add_argument("--format", choices=FORMAT_CHOICES, default="onnx")
    b.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="which file of the format (default: the most precise one exported)")
    b.add_argument("--dest", type=Path, default=ASSETS_MODEL_DIR,
                   help="the bundle folder: empty, new, or an earlier bundle (anything else is refused)")
    b.add_argument("--allow-unverified", action="store_true",
                   help="bundle a model file that `make verify` has not passed (or that failed it)")
    return p


def _expand(paths: list[Path]) -> list[Path]:
    from cellcore.imaging import list_images

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = list_images(p)
            if not found:  # a labelled folder (one subfolder per class, as training reads): its subfolders' images
                found = [f for d in sorted(q for q in p.iterdir() if q.is_dir() and not q.name.startswith("."))
                         for f in list_images(d)]
            if not found:
                log.warning("%s: no images in this folder or its subfolders", p)
            out += found
        else:
            out.append(p)
    return out


def cmd_classify(args: argparse.Namespace) -> int:
    from mobile_app.classifier import CellClassifier

    try:
        clf = CellClassifier(resolve_model_dir(args.model_dir), fmt=args.format, panel=args.panel)
        clf.load()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    images = _expand(args.images)
    if not images:
        print("error: no images given", file=sys.stderr)
        return 2
    for path in images:
        try:
            pred = clf.classify(path, box=args.box)
        except (BadImageError, InferenceError, BoxError) as exc:
            failed += 1
            reason = exc.reason if isinstance(exc, BadImageError) else str(exc)
            if args.json:
                print(json.dumps({"path": str(path), "error": reason}), flush=True)
            else:
                print(f"{path}\terror: {reason}", flush=True)
            continue
        if args.json:
            print(json.dumps({**pred.to_dict(), "provider": getattr(clf.load(), "provider", "")}), flush=True)
        else:
            line = f"{path}\t{pred.label}\t{pred.probability:.4f}"
            if pred.box is not None:  # the square actually classified (moved inside the photo if needed)
                line += f"\tbox {format_box(pred.box)}"
            print(line + (f"\t{pred.message}" if pred.uncertain else ""), flush=True)
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from mobile_app.app import run_app

    from mobile_app.runtimes import detect_platform

    try:
        model_dir = resolve_model_dir(args.model_dir)
    except NoModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if detect_platform() == "desktop":  # before a window opens: the terminal is where `make app` is read
            return 2
        model_dir = default_model_dir()  # a phone has no terminal: the app opens and says it on screen
    return run_app(model_dir=model_dir, fmt=args.format, data_dir=args.data_dir, panel=args.panel,
                   script=args.script, result=args.result)


def cmd_bundle(args: argparse.Namespace) -> int:
    from mobile_app.android_versions import check_for_android
    from mobile_app.manifest import MANIFEST_NAME, load_manifest, verify_artifact

    try:
        manifest = load_manifest(args.model_dir)
        artifact = manifest.choose((args.format,), args.format, args.precision)
        src = verify_artifact(artifact)
        # refused here, on the desktop, rather than by the phone's runtime after a build and install
        readable = check_for_android(src, artifact.format)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = ((manifest.raw.get("metrics") or {}).get("verify") or {}).get(artifact.file, {}).get("status")
    if status != "PASS" and not args.allow_unverified:
        print(f"error: {artifact.file} has {'not been verified' if status is None else f'verify status {status!r}'}"
              f" (make verify); refusing to put it in a phone build. Pass --allow-unverified to do it anyway.",
              file=sys.stderr)
        return 2
    dest: Path = args.dest
    foreign = foreign_files(dest)
    if foreign:
        print(f"error: refusing to replace {dest}: it holds files that are not an earlier model bundle "
              f"({', '.join(sorted(foreign)[:5])}); choose an empty or new folder", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():  # one model per build: drop what an earlier bundle left (checked above)
        if old.name != ".gitkeep":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if src.is_dir():
        shutil.copytree(src, dest / artifact.file)
    else:
        shutil.copy2(src, dest / artifact.file)
    shutil.copy2(manifest.path, dest / MANIFEST_NAME)
    (dest / MODEL_CARD_NAME).write_text(model_card(manifest.raw, artifact.file), encoding="utf-8")
    verify_artifact(load_manifest(dest).choose((args.format,), args.format, args.precision))
    vendor_cellcore()
    print(f"bundled {artifact.file} + {MANIFEST_NAME} + {MODEL_CARD_NAME} into {dest}"
          + (f" ({readable})" if readable else ""))
    return 0


def foreign_files(dest: Path) -> list[str]:
    """Names in `dest` that an earlier bundle did not put there ([] for a new, empty or bundle folder)."""
    import json

    from mobile_app.manifest import MANIFEST_NAME

    if not dest.exists():
        return []
    if not dest.is_dir():
        return [dest.name]
    names = {p.name for p in dest.iterdir()} - {".gitkeep"}
    if not names:
        return []
    try:
        owned = {MANIFEST_NAME, MODEL_CARD_NAME} | {a["file"] for a in
                                                    json.loads((dest / MANIFEST_NAME).read_text())["artifacts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(names)  # no readable manifest: not a bundle
    return sorted(names - owned)


def vendor_cellcore() -> Path:
    """Phone builds package only the app folder: put the shared cellcore package inside it (git-ignored).

    The phone's main.py puts the app folder on sys.path, so `import cellcore` finds this copy there,
    which is the very code training and export ran (copied, not re-implemented).
    """
    import cellcore

    src = Path(cellcore.__file__).parent
    dest = Path(__file__).resolve().parent / "cellcore"
    if src.resolve() != dest.resolve():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    if args.command != "run":  # Kivy sets up logging for the UI itself
        logging.basicConfig(level=os.environ.get("CELLVIT_LOG", "WARNING").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"classify": cmd_classify, "run": cmd_run, "bundle": cmd_bundle}
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:  # anything the user can act on, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
