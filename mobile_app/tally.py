"""Differential count: per-image results, hand corrections, per-class tally; saved atomically on every change."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cellcore.files import atomic_write_text

log = logging.getLogger(__name__)

TALLY_VERSION = 1  # entries gained an optional "box" (older files have none and load as default crops)
TALLY_NAME = "differential_count.json"
CSV_COLUMNS = ("#", "file", "predicted", "probability", "uncertain", "label", "corrected", "time_utc",
               "box_x", "box_y", "box_size")


class TallyError(OSError):
    """The tally could not be written; the in-memory tally is intact and the old file untouched."""


@dataclass
class CountEntry:
    """One classified cell of the count."""

    file: str
    predicted: str
    probability: float
    uncertain: bool
    label: str  # the label that counts: the model's, or the hand correction
    corrected: bool = False
    time_utc: str = ""
    # the square classified (centre x, centre y, side; pixels of the photo as stored), so the cell can be
    # found again; None: the whole photo through the model's own crop
    box: tuple[float, float, float] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> CountEntry:
        box = d.get("box")
        return cls(file=str(d["file"]), predicted=str(d["predicted"]), probability=float(d["probability"]),
                   uncertain=bool(d.get("uncertain", False)), label=str(d.get("label", d["predicted"])),
                   corrected=bool(d.get("corrected", False)), time_utc=str(d.get("time_utc", "")),
                   box=None if box is None else _box(box))


def _box(values: object) -> tuple[float, float, float]:
    """[x, y, size] from a saved count -> a box; anything else is a damaged entry (ValueError/TypeError)."""
    x, y, size = (float(v) for v in values)  # type: ignore[union-attr]
    return (x, y, size)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class DifferentialCount:
    """Running tally per class; every change is saved to `path` (if given) before the call returns."""

    def __init__(self, classes: list[str], path: Path | str | None = None):
        self.classes = list(classes)
        self.entries: list[CountEntry] = []
        self.path = Path(path) if path else None
        self.notice = ""  # set when a damaged file was set aside on load
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ changes

    def add(self, file: str, predicted: str, probability: float, uncertain: bool,
            box: tuple[float, float, float] | None = None) -> CountEntry:
        with self._lock:
            entry = CountEntry(file=str(file), predicted=predicted, probability=float(probability),
                               uncertain=bool(uncertain), label=predicted, time_utc=_utc_now(),
                               box=None if box is None else _box(box))
            self.entries.append(entry)
            self._changed()
            return entry

    def correct(self, index: int, label: str) -> CountEntry:
        """Set the counted label of entry `index` by hand (back to the prediction clears the correction)."""
        with self._lock:
            if not 0 <= index < len(self.entries):
                raise IndexError(f"no entry {index} (the count has {len(self.entries)})")
            if label not in self.all_classes():
                raise ValueError(f"unknown class {label!r}; valid: {', '.join(self.all_classes())}")
            e = self.entries[index]
            e.label, e.corrected = label, label != e.predicted
            self._changed()
            return e

    def remove(self, index: int) -> CountEntry:
        with self._lock:
            e = self.entries.pop(index)
            self._changed()
            return e

    def reset(self) -> None:
        with self._lock:
            self.entries.clear()
            self._changed()

    def _changed(self) -> None:
        if self.path is not None:
            self.save()

    # ------------------------------------------------------------------ views

    def all_classes(self) -> list[str]:
        """Manifest classes, then any label only found in restored entries (a model changed under a count)."""
        extra = sorted({e.label for e in self.entries} - set(self.classes))
        return self.classes + extra

    def counts(self) -> dict[str, int]:
        with self._lock:
            c = {k: 0 for k in self.all_classes()}
            for e in self.entries:
                c[e.label] += 1
            return c

    def percentages(self) -> dict[str, float]:
        counts = self.counts()
        total = sum(counts.values())
        return {k: (100.0 * v / total if total else 0.0) for k, v in counts.items()}

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        with self._lock:
            return {"version": TALLY_VERSION, "classes": self.classes, "saved_utc": _utc_now(),
                    "entries": [asdict(e) for e in self.entries]}  # a box tuple is written as a JSON list

    def save(self) -> Path:
        if self.path is None:
            raise TallyError("this count has no file to save to")
        try:
            atomic_write_text(self.path, json.dumps(self.to_dict(), indent=1))
        except OSError as exc:
            raise TallyError(f"could not save the count to {self.path}: {exc}") from exc
        return self.path

    @classmethod
    def restore(cls, path: Path | str, classes: list[str] | None = None) -> DifferentialCount:
        """Load the saved count, or start empty; a damaged file is kept aside (renamed), never overwritten."""
        path = Path(path)
        count = cls(classes or [], path)
        if not path.exists():
            return count
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data.get("version") if isinstance(data, dict) else None
            if version != TALLY_VERSION:
                raise ValueError(f"unknown tally format (version {version!r})")
            count.entries = [CountEntry.from_dict(d) for d in data.get("entries", [])]
            if not count.classes:  # no model yet: the classes the count was made with
                count.classes = [str(c) for c in data.get("classes", [])]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            aside = path.with_name(f"{path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
            try:
                os.replace(path, aside)
            except OSError as exc2:
                raise TallyError(f"the saved count {path} is damaged ({exc}) and could not be set aside "
                                 f"({exc2}); it was left untouched") from exc2
            count.entries = []
            count.notice = f"the saved count could not be read ({exc}); it was kept as {aside.name}"
            log.warning("%s", count.notice)
        return count

    def export_csv(self, path: Path | str) -> tuple[Path, Path]:
        """Per-image results to `path`, the tally (counts and %) to `<stem>_tally.csv` beside it."""
        path = Path(path)
        if path.suffix.lower() != ".csv":
            path = path.with_suffix(".csv")
        tally_path = path.with_name(f"{path.stem}_tally.csv")
        with self._lock:
            rows: list[list[object]] = [list(CSV_COLUMNS)]
            rows += [[i + 1, e.file, e.predicted, f"{e.probability:.4f}", "yes" if e.uncertain else "no",
                      e.label, "yes" if e.corrected else "no", e.time_utc,
                      *(["", "", ""] if e.box is None else [_num(v) for v in e.box])]
                     for i, e in enumerate(self.entries)]
            counts, pct = self.counts(), self.percentages()
            tally: list[list[object]] = [["class", "count", "percent"]]
            tally += [[k, counts[k], f"{pct[k]:.1f}"] for k in counts]
            tally.append(["total", sum(counts.values()), "100.0" if self.entries else "0.0"])
        for target, table in ((path, rows), (tally_path, tally)):
            atomic_write_text(target, _csv_text(table))
        return path, tally_path


def read_csv(path: Path | str) -> list[CountEntry]:
    """The per-image rows of an exported count, to check its results later.

    CSVs written before the box columns existed load with box None (the default crop), as do rows
    whose box cells are empty. A row that cannot be read raises ValueError naming its line.
    """
    path = Path(path)
    entries = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                cells = [row.get(k) or "" for k in ("box_x", "box_y", "box_size")]
                entries.append(CountEntry(
                    file=row["file"], predicted=row["predicted"], probability=float(row["probability"]),
                    uncertain=row.get("uncertain") == "yes", label=row.get("label") or row["predicted"],
                    corrected=row.get("corrected") == "yes", time_utc=row.get("time_utc") or "",
                    box=_box(cells) if all(cells) else None))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path.name} line {len(entries) + 2}: not a count row ({exc})") from exc
    return entries


def _num(v: float) -> str:
    """A pixel coordinate for the CSV: whole pixels without decimals, else one decimal."""
    return f"{v:.1f}".removesuffix(".0")


def _csv_text(rows: list[list[object]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def default_data_dir() -> Path:
    """Where the count lives when no Kivy App says otherwise: $CELLVIT_DATA_DIR or the XDG data folder."""
    env = os.environ.get("CELLVIT_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cellvit"
