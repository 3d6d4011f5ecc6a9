"""Cross-lab pieces on real images: stain-invariant input norm, robust training options, picture checks, calibration."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcore.imaging import decode
from cellcore.preprocess import Preprocessing
from cellcore.quality import PictureChecks
from cellcore.uncertainty import (THRESHOLDS, UncertaintyRule, choose_threshold, fit_temperature, rule_for, softmax,
                                  wilson)

torch = pytest.importorskip("torch")


def _batch(paths: list[Path], size: int = 64) -> "torch.Tensor":
    from train.data import load_rgb

    prep = Preprocessing(size)
    return torch.stack([torch.from_numpy(np.asarray(prep.apply(load_rgb(p)))).permute(2, 0, 1)
                        for p in paths]).float() / 255  # [N, 3, S, S] float32 in 0..1


@pytest.fixture(scope="module")
def real_cells(pbc_sample: Path) -> list[Path]:
    return sorted(p for p in pbc_sample.rglob("*.jpg"))[:12]


@pytest.fixture(scope="module")
def crosslab(pbc_dev: Path) -> Path:
    root = pbc_dev.parent / "crosslab_dev"
    if not root.exists():
        pytest.skip(f"{root} not found")
    return root


@pytest.mark.parametrize("input_norm,invariant", [("od_instance", True), ("od_background", True), ("od_gray", True),
                                                 ("od_aligned", True), ("od_sharp", True), ("rgb_instance", False),
                                                 ("imagenet", False)])
def test_od_instance_norm_ignores_a_colour_cast(real_cells: list[Path], input_norm: str, invariant: bool) -> None:
    """A lamp's or camera's colour cast (a gain per channel) is an offset in optical density: od_instance removes it."""
    from train.models import create_model

    torch.manual_seed(0)
    model = create_model("mobilevit_xxs", 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), input_norm).eval()
    x = _batch(real_cells)
    cast = x * torch.tensor([0.95, 0.85, 0.6]).view(1, 3, 1, 1)  # a yellow lamp: less blue
    with torch.no_grad():
        a, b = model.normalise(x), model.normalise(cast)
    # pixels darker than the 1/255 clamp after the cast are the only ones allowed to differ
    diff = (a - b).abs().amax().item()
    assert (diff < 1e-3) == invariant, f"{input_norm}: max difference {diff}"


def test_sharpen_soft_lifts_another_labs_soft_crops_and_leaves_sharp_pbc_cells_alone(real_cells: list[Path],
                                                                                    crosslab: Path) -> None:
    """od_sharp's unsharp mask: another lab's soft camera crops come out about SHARPEN_TARGET sharp (the measure
    is cellcore.quality's, the one the picture checks use), PBC's sharp cells are returned bit for bit, and it
    commutes with the 8 rotations and mirrors (the test-time views share one normalisation)."""
    from cellcore.quality import _sharpness
    from train.models import SHARPEN_TARGET, dihedral_views, sharpen_soft, sharpness

    soft = _batch(sorted(crosslab.rglob("*.bmp"))[::25])  # [12, 3, 64, 64]
    x = torch.cat([soft, _batch(real_cells)])
    before = sharpness(x)
    ref = [_sharpness(np.asarray(im.permute(1, 2, 0).numpy() * 255, dtype=np.float32)) for im in x]
    assert np.allclose(before.numpy(), ref, atol=1e-4)  # the graph measures what cellcore.quality measures
    y = sharpen_soft(x)
    after = sharpness(y)
    lifted = before < SHARPEN_TARGET
    assert lifted[:len(soft)].sum() >= len(soft) - 2 and lifted[len(soft):].sum() <= 2
    assert ((after[lifted] > 0.9 * SHARPEN_TARGET) & (after[lifted] <= SHARPEN_TARGET + 1e-4)).all(), after[lifted]
    assert torch.equal(y[~lifted], x[~lifted])
    n = len(x)
    views = sharpen_soft(dihedral_views(x)).reshape(8, n, *x.shape[1:])
    assert (views - dihedral_views(y).reshape(8, n, *x.shape[1:])).abs().max() < 1e-5


def test_crosslab_preset_end_to_end_app_equals_pytorch_on_both_labs(pbc_sample: Path, crosslab: Path,
                                                                    tmp_path: Path) -> None:
    """The crosslab preset's crop (with its minimum side), input norm and 2x-source augmentation train, travel in
    the checkpoint and the manifest, and the app (`CellClassifier` on the exported ONNX, torch-free preprocessing)
    gives PyTorch's calibrated probabilities and the manifest's rule on real PBC and other-lab photos."""
    from export.cli import main as export_main
    from mobile_app.classifier import CellClassifier
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.cli import main
    from train.data import load_rgb

    run = tmp_path / "xl"
    assert main(["--data", str(pbc_sample), "--run-dir", str(run), "--preset", "crosslab", "--image-size", "64",
                 "--epochs", "1", "--warmup-epochs", "0", "--max-steps-per-epoch", "2", "--batch-size", "16",
                 "--plots", "false"]) == 0
    ckpt = load_checkpoint(run / "best.pt")
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    assert (prep.resize, prep.input_norm, prep.cell_min_side, ckpt["config"]["augment"],
            ckpt["config"]["grad_clip"], prep.cell_max_side) == ("cell_square_crop_then_resize", "od_sharp", 0.45, "robust_soft", 1.0, 1.0)
    model, prep2, classes = model_from_checkpoint(ckpt)
    assert model.input_norm == "od_sharp" and prep2 == prep
    assert export_main(["--run-dir", str(run), "--formats", "onnx_fp32", "onnx_int8", "--calib-images", "16",
                        "--not-a-white-cell", "platelet"]) == 0
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    # od_sharp's unsharp mask (Mul, Add: ops the int8 quantiser would take) stays fp32 in the int8 file
    import onnx

    from export.exporters import fp32_nodes, input_norm_nodes

    arch = ckpt["arch"]
    assert arch == "mobilevit_xs"  # the preset's model
    norm = set(input_norm_nodes(run / "export" / f"{arch}_onnx_fp32.onnx"))
    graph = onnx.load(str(run / "export" / f"{arch}_onnx_int8.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    assert len(norm) > 100 and len(norm) == sum(n.name in norm for n in graph.node)
    assert not [n.name for n in graph.node if n.name in norm and any(producer.get(i) == "DequantizeLinear"
                                                                        for i in n.input)]
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 50  # the backbone is int8
    # the classifier layer, the feature distance and the output are not quantised either: nothing they compute
    # is rounded to 8 bits (fp32_nodes)
    tail = set(fp32_nodes(run / "export" / f"{arch}_onnx_fp32.onnx")) - norm
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    assert len(tail) > 5 and tail <= {n.name for n in graph.node}
    assert not [n.name for n in graph.node if n.name in tail and any(consumers.get(o) == "QuantizeLinear"
                                                                        for o in n.output)]
    assert Preprocessing.from_dict(manifest["preprocessing"]) == prep
    assert manifest["uncertainty"]["not_a_white_cell"] == ["platelet"]
    photos = sorted(pbc_sample.rglob("*.jpg"))[::7][:8] + sorted(crosslab.rglob("*.bmp"))[::40]
    x = torch.stack([torch.from_numpy(np.asarray(prep.apply(load_rgb(p)))).permute(2, 0, 1) for p in photos])
    from train.distance import attach_from_export

    assert attach_from_export(model, manifest, run / "export")  # the feature distance column, as exported
    with torch.no_grad():
        out = model.eval()(x.float() / 255).numpy()  # [N, C + 1], fed as training feeds the model
    ref, dist = out[:, :len(classes)], out[:, len(classes)]  # logits, feature distance
    clf = CellClassifier(run / "export", fmt="onnx", platform="desktop")
    preds = [clf.classify(p) for p in photos]
    rule = rule_for(manifest, clf.artifact.file)
    assert rule.not_a_cell == (classes.index("platelet"),) and clf.rule == rule and rule.max_distance > 0
    got = np.array([p.probabilities for p in preds])
    assert np.abs(got - softmax(ref, rule.temperature)).max() < 1e-4
    for p, probs, d in zip(preds, got, dist):
        assert p.uncertain == rule.uncertain(float(probs.max()), p.problems, int(probs.argmax()), d)
        assert (p.label == "platelet") <= p.uncertain  # a platelet answer is always flagged
        assert rule.far(d) == any(pr.startswith("unlike the training cells") for pr in p.problems)
    # verify on a panel: its own tables and manifest record, the all-class record untouched, every file's
    # panel accuracy the panel's argmax of its outputs
    from export.verify import main as verify_main

    before = json.loads((run / "export" / "manifest.json").read_text())["metrics"].get("verify")
    assert verify_main(["--run-dir", str(run), "--data", str(crosslab), "--limit", "30", "--panel", "wbc5"]) in (0, 1)
    after = json.loads((run / "export" / "manifest.json").read_text())["metrics"]
    assert after.get("verify") == before
    rec = after["verify_other"]["crosslab_dev, panel wbc5"]
    table = json.loads((run / "export" / "verify_crosslab_dev_panel_wbc5.json").read_text())
    assert rec["panel"] == table["panel"] == "wbc5" and rec["images"] == 30
    ref = next(r for r in table["rows"] if r["file"] == "best.pt")
    assert ref["accuracy_panel"] >= ref["accuracy"] - 1e-9 >= 0  # crosslab's labels are all on the panel
    assert {r["file"] for r in table["rows"]} == {"best.pt", f"{arch}_onnx_fp32.onnx", f"{arch}_onnx_int8.onnx"}
    assert all(r["accuracy_panel"] is not None and r["flagged_off_panel"] is not None for r in table["rows"])
    assert "accuracy on the panel" in (run / "export" / "verify_crosslab_dev_panel_wbc5.md").read_text()


def test_picture_checks_flag_non_cells_and_pass_real_cells(pbc_dev: Path, real_cells: list[Path], crosslab: Path,
                                                           tmp_path: Path) -> None:
    from benchmarks.noncell import write_set
    from train.data import load_rgb

    checks = PictureChecks()
    files = write_set(pbc_dev, tmp_path / "noncell", per_kind=2)
    flagged = {f.parent.name: [] for f in files}
    for f in files:
        flagged[f.parent.name].append(bool(checks.problems(load_rgb(f))))
    for kind in ("empty_field", "text", "hand", "blurred_cell"):
        assert all(flagged[kind]), f"{kind} not flagged by the picture checks"
    assert not any(checks.problems(load_rgb(p)) for p in real_cells)
    cl = sorted(crosslab.rglob("*.bmp"))[::10]
    assert sum(bool(checks.problems(load_rgb(p))) for p in cl) <= 0.2 * len(cl)  # soft, but cells


def test_temperature_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(z, 2.0)])  # labels drawn at T = 2
    assert fit_temperature(z, labels) == pytest.approx(2.0, rel=0.12)


@pytest.mark.parametrize("target,case", [(0.9, "met"), (1.01, "missed"), (0.9, "none right")])
def test_threshold_meets_the_target_or_says_it_missed_it(target: float, case: str) -> None:
    """The smallest threshold whose accepted validation answers reach the target; when none does, the one with
    the highest lower 95% bound on their accuracy, marked target_met false; null only when no answer is right."""
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(0, 2, (300, 4)))
    # calibrated by construction: a prediction is right with the probability it states
    labels = np.where(rng.random(300) < probs.max(1), probs.argmax(1), (probs.argmax(1) + 1) % 4)
    if case == "none right":
        labels = (probs.argmax(1) + 1) % 4
    got = choose_threshold(probs, labels, target)
    json.dumps(got, allow_nan=False)  # valid JSON for any reader: null, never NaN
    assert got["target_met"] == (case == "met") and (got["threshold"] is None) == (case == "none right")
    if case == "none right":
        return
    correct, top = probs.argmax(1) == labels, probs.max(1)
    keep = top >= got["threshold"]
    lo, hi = got["accuracy_ci95"]
    assert got["accepted"] == keep.sum() < len(labels) and lo <= got["accuracy_at_or_above"] <= hi
    assert got["accuracy_at_or_above"] == pytest.approx(correct[keep].mean())
    lower = [t for t in THRESHOLDS if t < got["threshold"]]
    if case == "met":
        # the smallest such threshold: one grid step lower misses the target (coverage is not given away)
        assert correct[keep].mean() >= target and lower and correct[top >= lower[-1]].mean() < target
    else:
        # no other threshold's accepted answers have a higher lower bound (so not a t keeping a handful)
        bounds = [wilson(int(correct[top >= t].sum()), int((top >= t).sum()))[0] for t in THRESHOLDS if (top >= t).any()]
        assert lo == pytest.approx(max(bounds)) and got["accepted"] >= 30


def test_rule_per_artifact_and_fallback() -> None:
    manifest = {"uncertainty": {"threshold": 0.7, "per_artifact": {"m_int8.onnx": {"temperature": 2.0, "threshold": None}}}}
    assert rule_for(manifest, "m_int8.onnx") == UncertaintyRule(2.0, None)
    assert rule_for(manifest, "other.pte") == UncertaintyRule(1.0, 0.7)
    assert rule_for(manifest, "m_int8.onnx").uncertain(0.999)  # null threshold: always uncertain
    assert UncertaintyRule(1.0, 0.5).uncertain(0.9, ["picture too blurred"])
    assert not UncertaintyRule(1.0, 0.5).uncertain(0.9)


def test_feature_distance_column_is_rule_step_5() -> None:
    """An output's column after the C logits is the feature distance: never a class score, flagged above the
    file's max_distance; a file without the column (Core ML) or an old manifest is judged without it."""
    manifest = {"classes": ["lymphocyte", "neutrophil"],
                "uncertainty": {"threshold": 0.6, "feature_distance": {"column": 2, "max_distance": 1.5},
                                "per_artifact": {"m_int8.pte": {"temperature": 1.0, "threshold": 0.6,
                                                                "max_distance": 2.5},
                                                 "m.mlpackage": {"temperature": 1.0, "threshold": 0.6}}}}
    out = np.array([[4.0, 0.0, 2.0], [4.0, 0.0, 0.4], [0.0, 0.1, 9.0]], dtype=np.float32)  # logits, distance
    fp32, int8, coreml = rule_for(manifest), rule_for(manifest, "m_int8.pte"), rule_for(manifest, "m.mlpackage")
    probs = fp32.probabilities(out)
    assert probs.shape == (3, 2) and np.allclose(probs, softmax(out[:, :2]))  # the distance is not a logit
    assert fp32.distances(out).tolist() == pytest.approx([2.0, 0.4, 9.0])
    assert fp32.flagged(probs, [[], [], []], fp32.distances(out)).tolist() == [True, False, True]
    assert int8.flagged(probs, [[], [], []], int8.distances(out)).tolist() == [False, False, True]
    assert coreml.max_distance is None and not coreml.far(9.0)
    assert fp32.distances(out[:, :2]) is None  # a file without the column
    assert rule_for({"classes": ["a", "b"], "uncertainty": {"threshold": 0.5}}).max_distance is None


def test_feature_distance_is_mahalanobis_on_the_models_own_features(smoke_run: Path, pbc_sample: Path,
                                                                     tmp_path: Path) -> None:
    """train.distance on real features of a trained model: the graph's whitened form equals the textbook
    min_c (f - mu_c)^T S^-1 (f - mu_c) / D with S the shrunk covariance, and the logits beside it are the
    model's own, with TTA too."""
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import ImageCache, scan_onto_classes
    from train.distance import FeatureDistance, fit_on_images

    model, prep, classes = model_from_checkpoint(load_checkpoint(smoke_run / "best.pt"), tta="dihedral8")
    cache = ImageCache.build(scan_onto_classes(pbc_sample, classes), prep)
    x_all = torch.from_numpy(cache.images).permute(0, 3, 1, 2).float() / 255  # [N, 3, S, S] float32 in 0..1
    with torch.no_grad():
        all_f = model.eval().features(x_all).double().numpy()  # [N, D]
    means = np.stack([all_f[cache.labels == c].mean(0) for c in range(len(classes))])
    raw = np.cov((all_f - means[cache.labels]).T, bias=True)
    x, f = x_all[::9], all_f[::9]
    for shrink in (0.3, None):  # None: the default, D / N clipped to 0.01..1 (here 96 images < 320 dims: 1)
        w = 1.0 if shrink is None else shrink
        cov = (1 - w) * raw + w * np.trace(raw) / len(raw) * np.eye(len(raw))
        inv = np.linalg.inv(cov)
        want = np.min([np.einsum("nd,de,ne->n", f - m, inv, f - m) for m in means], axis=0) / f.shape[1]
        dist = FeatureDistance.fit(all_f, cache.labels, shrink) if shrink else fit_on_images(model, cache.images,
                                                                                              cache.labels)
        with torch.no_grad():
            model.distance = None
            plain = model(x).numpy()
            model.distance = dist
            out = model(x).numpy()
        assert out.shape == (len(x), len(classes) + 1) and np.abs(out[:, :-1] - plain).max() < 1e-4
        assert np.allclose(out[:, -1], want, rtol=1e-3), np.abs(out[:, -1] / want - 1).max()
    dist.save(tmp_path / "fd.npz")
    loaded = FeatureDistance.load(tmp_path / "fd.npz")
    assert torch.allclose(loaded(torch.from_numpy(f).float()), dist(torch.from_numpy(f).float()))
    with pytest.raises(ValueError, match="more training images"):
        FeatureDistance.fit(f[:2], np.array([0, 1]))
    one = FeatureDistance.fit(f[:3], np.array([0, 1, 1]))  # one image of class 0 (a fine-tune's lone basophil)
    assert torch.allclose(one.class_z[0], (torch.from_numpy(f[0]).float() - one.centre) @ one.proj.T, atol=1e-4)


def test_not_a_white_cell_classes_are_always_flagged() -> None:
    """Step 4 of the rule: a confident answer of a class declared "not a white cell" is still flagged."""
    manifest = {"classes": ["lymphocyte", "neutrophil", "platelet"],
                "uncertainty": {"threshold": 0.5, "not_a_white_cell": ["platelet", "not-a-class"]}}
    rule = rule_for(manifest, "m.onnx")
    assert rule.not_a_cell == (2,)
    probs = np.array([[0.98, 0.01, 0.01], [0.01, 0.01, 0.98], [0.4, 0.3, 0.3]], dtype=np.float32)
    assert rule.flagged(probs, [[], [], []]).tolist() == [False, True, True]
    assert rule.uncertain(0.98, (), 0) is False and rule.uncertain(0.98, (), 2) is True
    # old manifests (no such key) flag nothing for its class
    assert rule_for({"classes": manifest["classes"], "uncertainty": {"threshold": 0.5}}).not_a_cell == ()


@pytest.mark.parametrize("min_side", [0.2, 0.45])
def test_cell_crop_never_shrinks_below_its_minimum_side(pbc_dev: Path, min_side: float) -> None:
    """A platelet or a small nucleus is framed with at least min_side of the photo, not blown up to a white
    cell's size; large white cells are framed by their nucleus alone (the minimum does not bind)."""
    from train.data import load_rgb

    prep = Preprocessing(64, resize="cell_square_crop_then_resize", cell_min_side=min_side)
    sides = {}
    for cls in ("platelet", "neutrophil"):
        for p in sorted((pbc_dev / cls).glob("*.jpg"))[:8]:
            rgb = load_rgb(p)
            l, t, r, b = prep.box_for(rgb)
            assert r - l == b - t and r - l >= round(min_side * min(rgb.size)) - 1
            sides.setdefault(cls, []).append((r - l) / min(rgb.size))
    assert np.median(sides["neutrophil"]) > 0.45  # a neutrophil's nucleus sets its square either way
    if min_side == 0.2:
        assert min(sides["platelet"]) < 0.45  # the old default zooms into platelets


@pytest.mark.parametrize("bad, match", [(dict(cell_min_side=0.0), "cell_min_side"),
                                        (dict(cell_max_side=2.0), "cell_max_side"),
                                        (dict(cell_min_side=0.7, cell_max_side=0.6), "cell_max_side")])
def test_preprocessing_rejects_a_bad_cell_side(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Preprocessing(64, resize="cell_square_crop_then_resize", **bad)


def test_cell_crop_stays_within_the_photo_at_max_side_1(crosslab: Path) -> None:
    """The other lab's cells fill their crops, so a nucleus-framed square reaches past the photo (up to 1.6x
    its short side, edge pixels repeated); with cell_max_side 1.0 it is at most the short side, and PBC's
    fields, whose cells are small, are framed exactly as before."""
    from train.data import load_rgb

    old = Preprocessing(64, resize="cell_square_crop_then_resize", cell_min_side=0.45)
    new = Preprocessing(64, resize="cell_square_crop_then_resize", cell_min_side=0.45, cell_max_side=1.0)
    past = 0
    for p in sorted((crosslab / "monocyte").glob("*.bmp"))[:12]:
        rgb = load_rgb(p)
        l, t, r, b = old.box_for(rgb)
        past += (r - l) > min(rgb.size)
        l, t, r, b = new.box_for(rgb)
        assert r - l == b - t <= min(rgb.size), p.name
    assert past >= 3  # the old bound does reach past these photos


@pytest.fixture(scope="module")
def pbc_stain_range(pbc_dev: Path) -> tuple[float, float, float, float]:
    """Fitted as export fits it, on every 10th pbc_dev photo (~530): the held-out checks use the others."""
    from cellcore.quality import stain_hue_range

    return stain_hue_range(sorted(pbc_dev.rglob("*.jpg"))[::10])


def test_stain_check_passes_pbc_and_flags_another_labs_stain(pbc_dev: Path, crosslab: Path,
                                                            pbc_stain_range: tuple[float, float, float, float]) -> None:
    """README: fitted on runs/odbg80's training split the range flags no PBC validation/test photo and 80% of
    crosslab_dev; with this smaller fit, PBC photos it did not see still pass and most of the other lab's are flagged."""
    checks = PictureChecks(stain_hue=pbc_stain_range)
    seen = set(sorted(pbc_dev.rglob("*.jpg"))[::10])
    pbc = [p for p in sorted(pbc_dev.rglob("*.jpg"))[5::53] if p not in seen]
    other = sorted(p for p in crosslab.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png", ".bmp"))[::5]
    stain_msg = lambda path: [m for m in checks.problems(decode(path).rgb) if m.startswith("stain colour")]  # noqa: E731
    assert [p.name for p in pbc if stain_msg(p)] == []
    flagged = sum(bool(stain_msg(p)) for p in other)
    assert flagged >= 0.6 * len(other), f"{flagged} of {len(other)} crosslab_dev photos flagged"


def test_stain_check_flags_a_red_violet_copy_of_a_pbc_cell(real_cells: list[Path],
                                                          pbc_stain_range: tuple[float, float, float, float]) -> None:
    """The same cell with its dye turned red-violet (less red absorbed, as the other lab's rapid stain)."""
    checks = PictureChecks(stain_hue=pbc_stain_range)
    for p in real_cells[:4]:
        a = np.asarray(decode(p).rgb, dtype=np.float32)
        od = -np.log(np.maximum(a, 1.0) / 255.0) * np.array([0.55, 1.0, 1.3], dtype=np.float32)
        shifted = Image.fromarray(np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8))
        assert not checks.problems(decode(p).rgb), p
        assert any(m.startswith("stain colour") for m in checks.problems(shifted)), p


@pytest.mark.parametrize("d,expected", [({}, None), ({"stain_hue": [0.3, 0.5, 0.2, 0.4]}, (0.3, 0.5, 0.2, 0.4)),
                                        ({"min_stain": 0.002, "min_sharpness": 0.031, "stain_hue": None}, None)])
def test_picture_checks_round_trip_through_the_manifest(d: dict, expected) -> None:
    checks = PictureChecks.from_dict(d)
    assert checks.stain_hue == expected
    assert PictureChecks.from_dict(json.loads(json.dumps(checks.to_dict()))) == checks


def test_a_malformed_stain_range_is_refused() -> None:
    with pytest.raises(ValueError, match="stain_hue must be"):
        PictureChecks.from_dict({"stain_hue": [0.3, 0.5]})


def test_noncell_measure_reports_stain_colour_per_folder(pbc_sample: Path, crosslab: Path, capsys) -> None:
    """`python -m benchmarks.noncell --measure` prints one row per folder with the nucleus colour the stain check uses."""
    from benchmarks.noncell import main

    assert main(["--measure", str(pbc_sample / "basophil"), str(crosslab / "basophil")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {pbc_sample}") or
            line.startswith(f"| {crosslab}")]
    assert len(rows) == 2
    pbc_red = float(rows[0].split("|")[5].split("/")[1])
    other_red = float(rows[1].split("|")[5].split("/")[1])
    assert 0.39 < pbc_red < 0.56 and other_red < pbc_red  # PBC's blue-violet nuclei absorb more red


def test_feature_distance_benchmark_tables_every_quantile(export_copy: Path, pbc_sample: Path, pbc_dev: Path,
                                                          tmp_path: Path) -> None:
    """`python -m benchmarks.feature_distance` on a real exported run: today's rule beside the rule plus the distance
    at each validation quantile, on the test split, a labelled folder and non-cell pictures; more flagged, never less."""
    from benchmarks.feature_distance import main
    from benchmarks.noncell import write_set

    write_set(pbc_dev, tmp_path / "noncell", per_kind=1)
    out = tmp_path / "fd"
    assert main(["--run-dir", str(export_copy), "--data", str(pbc_sample), "--noncell", str(tmp_path / "noncell"),
                 "--quantiles", "0.5", "0.9", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["thresholds"]) == ["0.5", "0.9"] and res["thresholds"]["0.5"] < res["thresholds"]["0.9"]
    for name in ("test split", pbc_sample.name):
        s = res["sets"][name]
        assert s["with_distance"]["0.5"]["flagged"] >= s["with_distance"]["0.9"]["flagged"] >= s["rule"]["flagged"]
    assert res["noncell"]["images"] == 6 and res["noncell"]["with_distance"]["0.5"] >= res["noncell"]["rule"]
    assert "+ distance > val q0.5" in out.with_suffix(".md").read_text()
    assert main(["--run-dir", str(export_copy), "--quantiles", "1.5"]) == 2  # refused, named


def test_crop_probe_as_trained_equals_evaluate_and_reframes(pbc_sample: Path, crosslab: Path, smoke_run: Path,
                                                             tmp_path: Path) -> None:
    """benchmarks.crop_probe: its as-trained row is exactly train.evaluate's accuracy (same crop, same model), other
    framings change what the model is shown, and a centre-crop run is refused with its reason."""
    from benchmarks.crop_probe import probe, to_markdown
    from train.cli import main
    from train.evaluate import evaluate

    run = tmp_path / "xl"
    assert main(["--data", str(pbc_sample), "--run-dir", str(run), "--preset", "crosslab", "--epochs", "1",
                 "--warmup-epochs", "0", "--max-steps-per-epoch", "2", "--batch-size", "16", "--plots", "false"]) == 0
    lab = tmp_path / "lab"
    for cls in ("lymphocyte", "neutrophil"):
        (lab / cls).mkdir(parents=True)
        for p in sorted((crosslab / cls).glob("*.bmp"))[:6]:
            (lab / cls / p.name).symlink_to(p)
    rows = probe(run, [str(lab)], fills=[0.55, 0.8], max_sides=[1.0], gray=True, tta="none", nucleus_only=True)
    assert [(r["cell_fill"], r["gray"], r["nucleus_only"], r["trained"]) for r in rows] == [
        (0.55, False, False, True), (0.8, False, False, False), (0.55, True, False, False), (0.55, False, True, False)]
    assert rows[0]["lab"]["accuracy"] == pytest.approx(evaluate(run / "best.pt", str(lab), run)["accuracy"])
    assert rows[0]["pbc test"]["accuracy"] == pytest.approx(evaluate(run / "best.pt", None, run)["accuracy"])
    assert rows[0]["lab"]["n"] == 12 and set(rows[0]["lab"]["recall"]) == {"lymphocyte", "neutrophil"}
    assert "(as trained)" in to_markdown(rows, run, "none")
    assert "nucleus only" in to_markdown(rows, run, "none")
    with pytest.raises(ValueError, match="nucleus-centred"):
        probe(smoke_run, [], None, None)


def test_nucleus_only_keeps_the_nucleus_and_paints_the_rest_one_colour(crosslab: Path, pbc_dev: Path) -> None:
    """benchmarks.crop_probe --nucleus-only on real cells of both labs: the darkest (nucleus) pixels are unchanged,
    the palest are all one colour, and a good share of the picture is repainted."""
    from benchmarks.crop_probe import _nucleus_only
    from cellcore.preprocess import Preprocessing
    from train.data import load_rgb

    prep = Preprocessing(input_size=64, resize="cell_square_crop_then_resize", cell_min_side=0.45, cell_max_side=1.0)
    paths = sorted((crosslab / "lymphocyte").glob("*.bmp"))[:3] + sorted((pbc_dev / "lymphocyte").glob("*"))[:3]
    images = np.stack([np.asarray(prep.apply(load_rgb(p))) for p in paths])   # [6, 64, 64, 3] uint8
    out = _nucleus_only(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    for img, o in zip(images, out):
        red_od = -np.log(np.maximum(img[..., 0].astype(np.float32), 1) / 255)
        nucleus = red_od > 0.8 * np.percentile(red_od, 99.5)  # surely nucleus: near the darkest red density
        assert np.array_equal(o[nucleus], img[nucleus])
        changed = (o != img).any(-1)
        assert 0.2 < changed.mean() < 0.95
        assert len(np.unique(o[changed], axis=0)) == 1


def test_tune_runs_candidates_in_parallel_and_reports_per_class_recall(pbc_sample: Path, crosslab: Path,
                                                                       tmp_path: Path) -> None:
    """benchmarks.tune_cpu_preset: two real (tiny) crosslab-preset candidates at once, each evaluated with TTA on its
    held-out split and on another lab's folder; the table and JSON carry accuracy and per-class recall."""
    from benchmarks.tune_cpu_preset import main

    lab = tmp_path / "lab"
    for cls in ("lymphocyte", "neutrophil"):
        (lab / cls).mkdir(parents=True)
        for p in sorted((crosslab / cls).glob("*.bmp"))[:4]:
            (lab / cls / p.name).symlink_to(p)
    tiny = "--epochs 1 --warmup-epochs 0 --max-steps-per-epoch 2 --batch-size 16 --plots false"
    out = tmp_path / "tune"
    assert main(["--data", str(pbc_sample), "--eval-data", str(lab), "--base-preset", "crosslab", "--tta", "dihedral8",
                 "--parallel", "2", "--out", str(out), "--name", "t",
                 "--candidate", f"a:{tiny}", "--candidate", f"b:--mixstyle 0.5 {tiny}"]) == 0
    res = json.loads((out / "t.json").read_text())
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert set(r["eval"]) == {"split", "lab"} and r["eval"]["lab"]["tta"] == "dihedral8"
        assert set(r["eval"]["lab"]["recall"]) == {"lymphocyte", "neutrophil"}
        rep = json.loads((out / f"tune_{'a' if r is res['a'] else 'b'}" / "eval" / "lab.json").read_text())
        assert rep["accuracy"] == r["eval"]["lab"]["accuracy"] and rep["tta"] == "dihedral8"
    table = (out / "t.md").read_text()
    assert "| a |" in table and "| b |" in table and "lab: lymp" in table
