"""Panels: which of a model's classes a lab's slides can show (e.g. the five-part white-cell differential).

A model trained on PBC knows 8 classes, three of which (erythroblast, immature granulocyte, platelet) a
peripheral-blood white-cell differential does not count. A lab that counts only the five-part differential
chooses that panel; the answer is then the most probable class on the panel (softmax over the panel's
classes only), and the rule (cellcore.uncertainty, step 6) flags every picture whose most probable class
over *all* the model's classes is off the panel: the lab said it does not expect that class, so such a
picture is shown, with its best class on the panel, for review. Nothing is retrained: the panel is applied
to the exported model's output, the same way in verification, benchmarks, the CLI and the app.

Why it helps other labs' pictures: the soft, evenly dark lymphocyte nuclei of another lab read as
PBC's erythroblasts and its monocytes as immature granulocytes (README "Cells from other labs"); on a
panel without those classes the model's second choice is usually right.
"""
from __future__ import annotations

from collections.abc import Sequence

# name -> the classes on the panel (None: every class the model knows). Names are PBC's class names
# (train/classmaps maps other datasets' labels onto them); a panel whose classes a model lacks is refused.
PANELS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    # the five-part white-cell differential of a peripheral blood smear (what hematology analysers report)
    "wbc5": ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"),
    # ... plus immature granulocytes (the extended differential)
    "wbc6": ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"),
}
PANEL_TITLES = {"all": "every class of the model", "wbc5": "five-part differential",
                "wbc6": "five-part differential + immature granulocytes"}


class PanelError(ValueError):
    """A panel name or class list that does not fit the model; the message lists the valid choices."""


def resolve_panel(spec: str | None, classes: Sequence[str]) -> tuple[int, ...] | None:
    """A panel name ("wbc5") or comma-separated class names ("lymphocyte,neutrophil") -> the indices of its
    classes in the model's `classes`, sorted; None for "all", "" or None (no panel: every class)."""
    spec = (spec or "").strip()
    if not spec or spec == "all":
        return None
    if spec in PANELS:
        wanted = list(PANELS[spec] or ())
    elif "," in spec or spec in classes:
        wanted = [c.strip() for c in spec.split(",") if c.strip()]
    else:
        raise PanelError(f"unknown panel {spec!r}: give one of {', '.join(PANELS)} or a comma-separated list of "
                         f"the model's classes ({', '.join(classes)})")
    missing = [c for c in wanted if c not in classes]
    if missing:
        raise PanelError(f"panel {spec!r} names {', '.join(missing)}, which the model does not know; its classes "
                         f"are {', '.join(classes)}")
    if len(set(wanted)) < 2:
        raise PanelError(f"panel {spec!r} must name at least two different classes of the model")
    idx = tuple(sorted({list(classes).index(c) for c in wanted}))
    return None if len(idx) == len(classes) else idx


def panel_label(spec: str | None) -> str:
    """What a report calls the panel: its title, or the class list as given."""
    spec = (spec or "").strip() or "all"
    return PANEL_TITLES.get(spec, spec)
