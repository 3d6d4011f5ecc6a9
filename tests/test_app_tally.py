"""Differential count: tally, corrections, CSV, and a saved file that survives restarts, crashes and damage."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from mobile_app import tally as tally_mod
from mobile_app.tally import TALLY_NAME, DifferentialCount, TallyError

CLASSES = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]


def make_count(path: Path) -> DifferentialCount:
    t = DifferentialCount(CLASSES, path)
    t.add("a.jpg", "neutrophil", 0.97, False)
    t.add("b.jpg", "neutrophil", 0.55, True)
    t.add("c.jpg", "lymphocyte", 0.91, False)
    t.add("d.jpg", "basophil", 0.88, False)
    return t


def test_counts_percentages_and_corrections(tmp_path: Path) -> None:
    t = make_count(tmp_path / TALLY_NAME)
    assert t.counts() == {"basophil": 1, "eosinophil": 0, "lymphocyte": 1, "neutrophil": 2}
    assert t.percentages()["neutrophil"] == pytest.approx(50.0)
    t.correct(1, "eosinophil")
    assert t.counts()["neutrophil"] == 1 and t.counts()["eosinophil"] == 1
    assert t.entries[1].corrected and t.entries[1].predicted == "neutrophil"
    t.correct(1, "neutrophil")  # back to the model's label: no longer a correction
    assert not t.entries[1].corrected
    with pytest.raises(ValueError, match="unknown class"):
        t.correct(0, "dragon")
    with pytest.raises(IndexError):
        t.correct(99, "basophil")
    t.remove(3)
    assert len(t) == 3 and sum(t.percentages().values()) == pytest.approx(100.0)


@pytest.mark.parametrize("change", ["add", "correct", "remove", "reset"])
def test_every_change_is_on_disk_before_the_call_returns(tmp_path: Path, change: str) -> None:
    path = tmp_path / "data" / TALLY_NAME
    t = make_count(path)
    {"add": lambda: t.add("e.jpg", "basophil", 0.9, False), "correct": lambda: t.correct(0, "basophil"),
     "remove": lambda: t.remove(0), "reset": t.reset}[change]()
    restored = DifferentialCount.restore(path, CLASSES)
    assert [e.__dict__ for e in restored.entries] == [e.__dict__ for e in t.entries]
    assert restored.counts() == t.counts()
    assert not list(path.parent.glob(".*.tmp")), "temp files left behind"


def test_failed_write_keeps_the_old_file_and_the_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / TALLY_NAME
    t = make_count(path)
    before = path.read_bytes()

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tally_mod.os, "replace", disk_full)
    with pytest.raises(TallyError, match="No space left"):
        t.add("e.jpg", "basophil", 0.9, False)
    monkeypatch.undo()
    assert path.read_bytes() == before  # old count intact on disk
    assert len(t) == 5  # and nothing lost in memory: the next save writes it
    t.save()
    assert len(DifferentialCount.restore(path, CLASSES)) == 5


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 99, "entries": []}', b"\xff\xfe\x00", b"[]"])
def test_damaged_file_is_set_aside_not_overwritten(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / TALLY_NAME
    path.write_bytes(content)
    t = DifferentialCount.restore(path, CLASSES)
    assert len(t) == 0 and "could not be read" in t.notice
    kept = list(tmp_path.glob("differential_count.damaged-*.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == content
    t.add("a.jpg", "basophil", 0.9, False)
    assert len(DifferentialCount.restore(path, CLASSES)) == 1


def test_restore_without_model_uses_the_saved_classes(tmp_path: Path) -> None:
    make_count(tmp_path / TALLY_NAME)
    t = DifferentialCount.restore(tmp_path / TALLY_NAME)  # model failed to load: classes from the file
    assert t.classes == CLASSES and t.counts()["neutrophil"] == 2


def test_labels_of_an_older_model_are_kept(tmp_path: Path) -> None:
    make_count(tmp_path / TALLY_NAME)
    t = DifferentialCount.restore(tmp_path / TALLY_NAME, ["lymphocyte", "neutrophil"])  # new model, fewer classes
    assert t.counts() == {"lymphocyte": 1, "neutrophil": 2, "basophil": 1}


def test_csv_export(tmp_path: Path) -> None:
    t = make_count(tmp_path / TALLY_NAME)
    t.correct(1, "eosinophil")
    images, tally = t.export_csv(tmp_path / "out" / "count.csv")
    rows = list(csv.DictReader(images.open()))
    assert [r["file"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert rows[1]["predicted"] == "neutrophil" and rows[1]["label"] == "eosinophil" and rows[1]["corrected"] == "yes"
    assert rows[1]["uncertain"] == "yes" and rows[0]["probability"] == "0.9700"
    summary = {r["class"]: r for r in csv.DictReader(tally.open())}
    assert summary["neutrophil"]["count"] == "1" and summary["eosinophil"]["percent"] == "25.0"
    assert summary["total"]["count"] == "4"
    assert json.loads((tmp_path / TALLY_NAME).read_text())["entries"][1]["label"] == "eosinophil"


def test_default_data_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLVIT_DATA_DIR", str(tmp_path))
    assert tally_mod.default_data_dir() == tmp_path
    monkeypatch.delenv("CELLVIT_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert tally_mod.default_data_dir() == tmp_path / "xdg" / "cellvit"
    assert os.environ.get("CELLVIT_DATA_DIR") is None


# ----------------------------------------------------------------------------- the picked square of each cell

OLD_CSV_HEADER = "#,file,predicted,probability,uncertain,label,corrected,time_utc\n"  # before box columns existed


def test_csv_round_trip_keeps_each_cells_square(tmp_path: Path) -> None:
    t = DifferentialCount(CLASSES, tmp_path / TALLY_NAME)
    t.add("field.jpg", "lymphocyte", 0.91, False, box=(260, 241.5, 360))
    t.add("field.jpg", "neutrophil", 0.55, True, box=(880.25, 301.75, 345.5))
    t.add("single.jpg", "basophil", 0.88, False)  # the default crop: no square
    t.correct(1, "eosinophil")
    images, _ = t.export_csv(tmp_path / "count.csv")
    rows = list(csv.DictReader(images.open()))
    assert list(rows[0]) == list(tally_mod.CSV_COLUMNS)
    assert [(r["box_x"], r["box_y"], r["box_size"]) for r in rows] == \
        [("260", "241.5", "360"), ("880.2", "301.8", "345.5"), ("", "", "")]
    back = tally_mod.read_csv(images)
    assert [e.box for e in back] == [(260.0, 241.5, 360.0), (880.2, 301.8, 345.5), None]
    assert [(e.file, e.predicted, e.label, e.corrected, e.uncertain, e.time_utc) for e in back] == \
        [(e.file, e.predicted, e.label, e.corrected, e.uncertain, e.time_utc) for e in t.entries]
    assert [e.probability for e in back] == pytest.approx([0.91, 0.55, 0.88])
    restored = DifferentialCount.restore(tmp_path / TALLY_NAME, CLASSES)  # and the saved count keeps them too
    assert [e.box for e in restored.entries] == [(260.0, 241.5, 360.0), (880.25, 301.75, 345.5), None]


@pytest.mark.parametrize("header,row", [
    (OLD_CSV_HEADER, "1,a.jpg,neutrophil,0.9700,no,neutrophil,no,2026-01-02T03:04:05Z\n"),
    (",".join(tally_mod.CSV_COLUMNS) + "\n", "1,a.jpg,neutrophil,0.9700,no,neutrophil,no,2026-01-02T03:04:05Z,,,\n"),
], ids=["old columns", "empty box cells"])
def test_a_csv_without_squares_loads_as_default_crops(header: str, row: str, tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_text(header + row)
    (entry,) = tally_mod.read_csv(path)
    assert entry.box is None and entry.file == "a.jpg" and entry.label == "neutrophil" and not entry.uncertain
    assert entry.probability == pytest.approx(0.97) and entry.time_utc == "2026-01-02T03:04:05Z"


def test_a_saved_count_from_before_squares_loads(tmp_path: Path) -> None:
    path = tmp_path / TALLY_NAME
    path.write_text(json.dumps({"version": 1, "classes": CLASSES, "entries": [
        {"file": "a.jpg", "predicted": "basophil", "probability": 0.9, "uncertain": False, "label": "basophil",
         "corrected": False, "time_utc": ""}]}))
    t = DifferentialCount.restore(path, CLASSES)
    assert not t.notice and len(t) == 1 and t.entries[0].box is None


def test_a_damaged_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(OLD_CSV_HEADER + "1,a.jpg,neutrophil,0.97,no,neutrophil,no,\n2,b.jpg,neutrophil,lots,no,,no,\n")
    with pytest.raises(ValueError, match="bad.csv line 3"):
        tally_mod.read_csv(path)
