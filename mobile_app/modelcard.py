"""MODEL_CARD.md for a bundled model, written from its manifest alone (what it is, how it was measured, on what)."""
from __future__ import annotations

MODEL_CARD_NAME = "MODEL_CARD.md"

DATA_LICENCES = {  # what a user must know before redistributing a model trained on it
    "pbc_dev": ("a subset of the PBC dataset (Acevedo et al., Data in Brief 2020, 17,092 images of normal "
                "peripheral blood cells, CellaVision DM96, May-Grünwald-Giemsa stain, Hospital Clinic of "
                "Barcelona), published under CC BY 4.0"),
}


def _pct(v: object) -> str:
    return f"{100 * float(v):.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def _ci(ci: object) -> str:
    return f"{_pct(ci[0])}–{_pct(ci[1])}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "n/a"


def model_card(m: dict, artifact_file: str) -> str:
    """Markdown model card for `artifact_file` of manifest `m` (numbers only from the manifest: never retyped)."""
    model, ds, metrics = m.get("model", {}), m.get("dataset", {}), m.get("metrics", {})
    entry = next((a for a in m.get("artifacts", []) if a.get("file") == artifact_file), {})
    src = metrics.get("verify_source") or {}
    ver = (metrics.get("verify") or {}).get(artifact_file, {})
    ref = (metrics.get("verify") or {}).get("best.pt", {})
    rule = ((m.get("uncertainty") or {}).get("per_artifact") or {}).get(artifact_file, {})
    prep = m.get("preprocessing", {})
    counts = ds.get("train_counts") or {}
    name = ds.get("name", "?")
    source = m.get("source") or {}
    lines = [
        f"# Model card: {artifact_file}",
        "",
        f"**{m.get('notice', '')}**",
        "",
        "## What it is",
        f"- {model.get('arch', '?')} ({model.get('params', '?')} parameters), trained from scratch, epoch "
        f"{model.get('epoch', '?')}; exported {m.get('created_utc', '?')} as {entry.get('format', '?')} "
        f"{entry.get('precision', '?')} ({entry.get('size_bytes', 0) / 1e6:.2f} MB, sha256 "
        f"{str(entry.get('sha256', ''))[:16]}…).",
        f"- Classes ({len(m.get('classes', []))}): {', '.join(m.get('classes', []))}.",
        f"- Input: {prep.get('input_size', '?')} px square, `{prep.get('resize', '?')}`; the app applies the "
        f"manifest's preprocessing exactly as training did."
        + (" The file averages its logits over the 8 rotations and mirrors of the picture (test-time augmentation "
           "inside the model: one call, 8x the compute), so how the phone is held does not change the answer."
           if model.get("tta", "none") == "dihedral8" else ""),
        f"- Made by commit {source.get('git_commit') or 'unknown'}"
        + (" (with uncommitted changes)" if source.get("dirty") else "") + f" from data fingerprint "
        f"{str(ds.get('fingerprint') or '?')[:16]}…; regenerate with `make release-model`.",
        "",
        "## Training data and licence",
        f"- {name}: {DATA_LICENCES.get(name, 'see the dataset’s own licence')}.",
        f"- {sum(counts.values()) if counts else '?'} training images: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "",
        "## Measured accuracy",
        f"On {src.get('source', 'unrecorded images')} ({src.get('images', '?')} images"
        + (f", fingerprint {str(src.get('fingerprint'))[:12]}" if src.get("fingerprint") else "") + "), "
        "never used for training or for choosing the model. 95% Wilson intervals.",
        "",
        "| model | accuracy | 95% CI | macro-F1 | agreement with PyTorch | verify |",
        "|---|---|---|---|---|---|",
        f"| this file | {_pct(ver.get('accuracy'))} | {_ci(ver.get('accuracy_ci95'))} | {_pct(ver.get('macro_f1'))} | "
        f"{_pct(ver.get('agreement'))} | {ver.get('status', 'not verified')} |",
        f"| PyTorch fp32 (reference) | {_pct(ref.get('accuracy'))} | {_ci(ref.get('accuracy_ci95'))} | "
        f"{_pct(ref.get('macro_f1'))} | – | reference |",
        "",
        "Per class (this file):",
        "",
        "| class | recall | 95% CI | images |",
        "|---|---|---|---|",
    ]
    for c, r in (ver.get("per_class") or {}).items():
        lines.append(f"| {c} | {_pct(r.get('recall'))} | {_ci(r.get('recall_ci95'))} | {r.get('support', '?')} |")
    threshold = rule.get("threshold")
    lines += [
        "",
        "## When it says “uncertain”",
        (f"- Answers with calibrated confidence below {threshold:.2f} (temperature {rule.get('temperature', 1.0):.2f}) "
         f"are shown as uncertain; on the validation split the rest were {_pct(rule.get('accuracy_at_or_above'))} "
         f"right ({_ci(rule.get('accuracy_ci95'))}) on {_pct(rule.get('coverage'))} of images."
         if isinstance(threshold, (int, float)) else
         "- No confidence level reached the target accuracy on the validation split: every answer is shown as "
         "uncertain."),
        "- Photos that fail the picture checks (no stained cell found, too blurred"
        + (", a stain colour unlike the training photos" if ((m.get("uncertainty") or {}).get(
            "picture_checks") or {}).get("stain_hue") else "") + ") are always uncertain.",
        *([f"- Answers of class {', '.join(nac)} are always shown as uncertain: not a white cell (the export "
           f"declared it so; a field of red cells or a platelet clump gets such answers)."]
          if (nac := (m.get("uncertainty") or {}).get("not_a_white_cell")) else []),
        "",
        "## What it was and was not tested on",
        f"- Tested: held-out images of {name} (same scanner, stain and framing as training), in this file's own "
        f"runtime ({entry.get('runtime', '?')}) on a Linux desktop.",
    ]
    for other, rec in (metrics.get("verify_other") or {}).items():
        r = (rec.get("results") or {}).get(artifact_file, {})
        on_panel = (f"accuracy of the panel's answers {_pct(r.get('accuracy_panel'))} (the model's own answers "
                    f"{_pct(r.get('accuracy'))}; images of classes off the panel count as wrong)" if rec.get("panel") else f"accuracy {_pct(r.get('accuracy'))}")
        lines.append(f"- Also measured on `{other}` ({rec.get('images', '?')} images): {on_panel}, flagged uncertain "
                     f"{_pct(r.get('flagged'))}, right when not flagged {_pct(r.get('accuracy_unflagged'))}.")
    lines += [
        "- Not tested: other labs' scanners, cameras and stains (a model trained on one lab's images can be badly "
        "wrong on another's: see the README, “Cells from other labs”; adapt it with `make finetune`), "
        "bone-marrow smears, abnormal or malignant cells, and any phone: nothing here ran on a real phone.",
        "- Not a diagnostic device. Every result must be reviewed by a qualified hematologist.",
        "",
    ]
    return "\n".join(lines)
