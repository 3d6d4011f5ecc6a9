"""Data layer on real pbc_dev images: decoding variants, bad input errors, class maps, zips, split, sampler."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_sample
from train.data import (
    BadImageError,
    ClassMap,
    DatasetError,
    ImageCache,
    load_rgb,
    load_split_samples,
    save_split,
    scan_dataset,
    stratified_split,
    held_out_part,
)
from train.preprocess import Preprocessing


@pytest.fixture(scope="module")
def real_rgb(pbc_dev: Path) -> np.ndarray:
    return np.asarray(Image.open(sorted((pbc_dev / "monocyte").iterdir())[0]).convert("RGB"))


def _write_variant(kind: str, rgb: np.ndarray, path: Path) -> Path:
    import tifffile

    if kind == "png_rgba":
        a = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
        Image.fromarray(a, "RGBA").save(path := path.with_suffix(".png"))
    elif kind == "bmp_gray":
        Image.fromarray(rgb.mean(2).astype(np.uint8), "L").save(path := path.with_suffix(".bmp"))
    elif kind == "tif_gray16":
        tifffile.imwrite(path := path.with_suffix(".tif"), (rgb.mean(2) * 257).astype(np.uint16))
    elif kind == "tiff_rgb16":
        tifffile.imwrite(path := path.with_suffix(".tiff"), rgb.astype(np.uint16) * 257)
    elif kind == "tif_rgb8":
        tifffile.imwrite(path := path.with_suffix(".tif"), rgb)
    elif kind == "png_palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(path := path.with_suffix(".png"))
    return path


@pytest.mark.parametrize("kind", ["png_rgba", "bmp_gray", "tif_gray16", "tiff_rgb16", "tif_rgb8", "png_palette"])
def test_every_supported_variant_decodes_to_8bit_rgb(kind: str, real_rgb: np.ndarray, tmp_path: Path) -> None:
    img = load_rgb(_write_variant(kind, real_rgb, tmp_path / "cell"))
    assert img.mode == "RGB" and img.size == (real_rgb.shape[1], real_rgb.shape[0])
    arr = np.asarray(img).astype(int)
    ref = real_rgb.astype(int) if kind not in ("bmp_gray", "tif_gray16") else np.repeat(real_rgb.mean(2, keepdims=True), 3, 2)
    # 16-bit -> 8-bit and palette quantisation lose a little; the picture must still be the same cell
    assert np.abs(arr - ref).mean() < (4 if kind == "png_palette" else 1.5)


@pytest.mark.parametrize("content,reason", [
    (b"not an image at all", "not an image"),
    ("truncated", "truncated"),
    (b"", "not an image"),
])
def test_unreadable_image_raises_with_path(content, reason: str, pbc_dev: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    if content == "truncated":
        content = sorted((pbc_dev / "basophil").iterdir())[0].read_bytes()[:3000]
    bad.write_bytes(content)
    with pytest.raises(BadImageError) as exc:
        load_rgb(bad)
    # the path travels with the error (skip reports list it); the message names the file for the user
    assert exc.value.path == str(bad) and "bad.jpg" in str(exc.value) and reason in str(exc.value)


def test_cache_skips_and_reports_corrupt_images(pbc_sample: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "data"
    shutil.copytree(pbc_sample, root, symlinks=True)
    (root / "ig" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    samples = scan_dataset(root)
    cache = ImageCache.build(samples, Preprocessing(64), workers=1)
    assert len(cache) == len(samples.paths) - 1
    assert [Path(p).name for p, _ in cache.skipped] == ["corrupt.jpg"]
    assert "corrupt.jpg" in caplog.text
    assert cache.images.shape[1:] == (64, 64, 3) and cache.images.dtype == np.uint8


@pytest.mark.parametrize("case,expected", [
    ("missing", "dataset not found"),
    ("empty_class", "class(es) with no images"),
    ("single_class", "need at least 2 classes"),
    ("no_folders", "no class folders found"),
    ("classmap_unknown", "names folders that do not exist: NOPE"),
])
def test_bad_datasets_give_clear_errors_naming_the_path(case: str, expected: str, pbc_dev: Path,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "d"
    cmap = None
    if case != "missing":
        root.mkdir()
    if case in ("empty_class", "classmap_unknown"):
        make_sample(pbc_dev, root, per_class=2, classes=["basophil", "monocyte"])
        if case == "empty_class":
            (root / "lymphocyte").mkdir()
        else:
            cmap = ClassMap.load({"keep": {"NOPE": "x", "basophil": "b"}})
    elif case == "single_class":
        make_sample(pbc_dev, root, per_class=2, classes=["basophil"])
    elif case == "no_folders":
        (root / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as exc:
        scan_dataset(root, cmap)
    assert expected in str(exc.value) and str(root) in str(exc.value)


AML_FOLDERS = ["BAS", "EBO", "EOS", "KSC", "LYA", "LYT", "MMZ", "MOB", "MON", "MYB", "MYO", "NGB", "NGS", "PMB", "PMO"]


def test_aml_paper_class_map_on_aml_layout(pbc_dev: Path, tmp_path: Path) -> None:
    """AML-Cytomorphology_LMU layout: AML-Cytomorphology_LMU/<CODE>/<CODE>_0001.tiff (real cells as stand-ins)."""
    import tifffile

    root = tmp_path / "AML-Cytomorphology_LMU"
    src = sorted((pbc_dev / "neutrophil").iterdir())
    for i, code in enumerate(AML_FOLDERS):
        (root / code).mkdir(parents=True)
        for j in range(2):
            rgb = np.asarray(Image.open(src[2 * i + j]).convert("RGB"))
            tifffile.imwrite(root / code / f"{code}_{j:04d}.tiff", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    samples = scan_dataset(tmp_path, ClassMap.load("aml_lmu_paper"))  # wrapper folder is descended into
    assert samples.classes == sorted(["myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "band_neutrophil",
                                      "segmented_neutrophil", "monocyte", "other"])
    counts = samples.counts()
    assert counts["other"] == 2 * (len(AML_FOLDERS) - 7) and counts["myeloblast"] == 2
    img = load_rgb(samples.root / samples.paths[0])  # RGBA TIFF, as the AML scans are
    assert img.mode == "RGB"


def test_class_map_caps_and_drops(pbc_sample: Path, tmp_path: Path) -> None:
    cmap_file = tmp_path / "map.yaml"
    cmap_file.write_text("keep: {neutrophil: granulocyte, eosinophil: granulocyte, lymphocyte: lymphocyte}\n"
                         "rest: null\nmax_per_class: 5\n")
    s = scan_dataset(pbc_sample, ClassMap.load(cmap_file))
    assert s.counts() == {"granulocyte": 5, "lymphocyte": 5}


def test_zip_dataset_reads_like_the_folder(pbc_dev: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = make_sample(pbc_dev, tmp_path / "PBC_dataset_normal_DIB", per_class=2)
    archive = tmp_path / "PBC_dataset_normal_DIB.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*.jpg")):
            zf.write(f.resolve(), f.relative_to(tmp_path))
    from_zip, from_dir = scan_dataset(archive), scan_dataset(folder)
    assert from_zip.classes == from_dir.classes and from_zip.paths == from_dir.paths
    assert from_zip.fingerprint() == from_dir.fingerprint()


def test_split_is_stratified_deterministic_and_saved(pbc_dev: Path, tmp_path: Path) -> None:
    samples = scan_dataset(pbc_dev)
    tr, va, te = stratified_split(samples.labels, 0.1, seed=0, test_fraction=0.1)
    assert stratified_split(samples.labels, 0.1, seed=0, test_fraction=0.1) == (tr, va, te)
    assert stratified_split(samples.labels, 0.1, seed=1, test_fraction=0.1) != (tr, va, te)
    assert not set(tr) & set(va) and not set(tr) & set(te) and not set(va) & set(te)
    assert len(tr) + len(va) + len(te) == len(samples.paths)
    lab = np.asarray(samples.labels)
    for c in range(len(samples.classes)):  # every class is 10% +- one image in validation and in test
        n = (lab == c).sum()
        assert abs((lab[va] == c).sum() - 0.1 * n) <= 1 and abs((lab[te] == c).sum() - 0.1 * n) <= 1
    # the paper's 90/10 (test_fraction 0) has the same validation part; test comes out of train
    tr90, va90, te90 = stratified_split(samples.labels, 0.1, seed=0)
    assert va90 == va and te90 == [] and sorted(tr + te) == tr90
    save_split(tmp_path / "split.json", samples, tr, va, 0, 0.1, te, 0.1)
    assert load_split_samples(tmp_path / "split.json", "val").paths == [samples.paths[i] for i in va]
    assert load_split_samples(tmp_path / "split.json", "test").paths == [samples.paths[i] for i in te]
    assert held_out_part(tmp_path / "split.json")[0] == "test"
    assert json.loads((tmp_path / "split.json").read_text())["fingerprint"] == samples.fingerprint()


@pytest.mark.parametrize("val,test", [(0.0, 0.1), (0.1, -0.1), (0.5, 0.5), (1.0, 0.0)])
def test_split_refuses_impossible_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1] * 20, val, seed=0, test_fraction=test)


def test_old_split_without_test_part_keeps_working_and_says_so(pbc_dev: Path, tmp_path: Path, caplog) -> None:
    samples = scan_dataset(pbc_dev)
    tr, va, _ = stratified_split(samples.labels, 0.1, seed=0)
    doc = {"root": str(samples.root), "classes": samples.classes, "seed": 0, "val_fraction": 0.1,
           "train": [[samples.paths[i], samples.classes[samples.labels[i]]] for i in tr],
           "val": [[samples.paths[i], samples.classes[samples.labels[i]]] for i in va]}
    (tmp_path / "split.json").write_text(json.dumps(doc))  # as runs wrote it before the test split
    with caplog.at_level("WARNING"):
        part, source = held_out_part(tmp_path / "split.json")
    assert part == "val" and "selection-biased" in source and "no test part" in caplog.text
    with pytest.raises(DatasetError, match="no 'test' part"):
        load_split_samples(tmp_path / "split.json", "test")


def test_balanced_sampler_draws_near_uniform_classes_from_imbalanced_pbc(pbc_dev: Path) -> None:
    import torch

    from train.sampler import DistributedBalancedSampler, make_sampler

    labels = np.asarray(scan_dataset(pbc_dev).labels)
    raw = np.bincount(labels) / len(labels)
    assert raw.max() / raw.min() > 2.5  # pbc_dev is imbalanced (neutrophil 1047 vs basophil 376)
    torch.manual_seed(0)
    drawn = labels[list(iter(make_sampler(labels)))]
    freq = np.bincount(drawn, minlength=8) / len(drawn)
    assert len(drawn) == len(labels)
    assert np.abs(freq - 1 / 8).max() < 0.02, freq  # 1/8 = 0.125 each, within 2 points
    # Distributed: two ranks draw disjoint shares of one stream that is itself balanced.
    ranks = [DistributedBalancedSampler(labels, r, 2, seed=0) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    stream = ranks[0].stream()
    assert list(iter(ranks[0])) == stream[0::2].tolist() and list(iter(ranks[1])) == stream[1::2].tolist()
    freq = np.bincount(labels[stream.numpy()], minlength=8) / len(stream)
    assert np.abs(freq - 1 / 8).max() < 0.02


def _symmetries(img):
    for m in (img, img.flip(-1)):
        for k in range(4):
            yield m.rot90(k, dims=(-2, -1))


@pytest.mark.parametrize("name", ["cells", "dihedral", "robust", "robust_cell", "robust_mild", "robust_soft",
                                  "robust_soft_colour", "robust_soft_dye", "robust_soft_defocus", "robust_soft_lowres",
                                  "robust_soft_gray", "robust_soft_zoom", "robust_strong"])
def test_augmentations_on_real_cells(name: str, pbc_sample: Path) -> None:
    import torch

    from train.augment import AUGMENTS, source_scale

    paths = sorted(p for p in pbc_sample.rglob("*") if p.is_file())[:16]
    pre = Preprocessing(input_size=64)

    def batch(prep: Preprocessing):  # [N, 3, S, S] float32 in 0..1
        return torch.stack([torch.from_numpy(np.asarray(prep.apply(load_rgb(p)))).permute(2, 0, 1)
                            for p in paths]).float() / 255

    x = batch(pre)
    k = source_scale(AUGMENTS[name])
    gen = torch.Generator().manual_seed(0)
    if k > 1:  # zooming augmentations read the same crop at k x the size
        src = batch(Preprocessing(input_size=64 * k))
        y = AUGMENTS[name](x.clone(), src, generator=gen)
        # the exact deploy-time images (p_clean) stay lossless symmetries; the rest are really resampled
        exact = [any(torch.equal(b, s) for s in _symmetries(a)) for a, b in zip(x, y)]
        assert 0 < sum(exact) < len(paths)
        with pytest.raises(ValueError, match="2x source"):
            AUGMENTS[name](x.clone(), None)
    else:
        y = AUGMENTS[name](x.clone(), generator=gen)
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    changed = [not torch.equal(a, b) for a, b in zip(x, y)]
    assert sum(changed) >= len(paths) // 2  # 7 of 8 orientations differ from the input
    if name == "dihedral":
        # Lossless: every output is one of the 8 symmetries of its input, pixel for pixel (no resampling blur).
        assert all(any(torch.equal(b, s) for s in _symmetries(a)) for a, b in zip(x, y))


@pytest.mark.parametrize("radius", [0.8, 1.6, 2.4])
def test_defocus_blur_is_a_normalised_disk_and_softens_real_cells(radius: float, pbc_sample: Path) -> None:
    """robust_soft_defocus: a point spreads into a flat disk of the drawn radius (weights summing to 1 per
    channel), and a real cell gets softer by cellcore's sharpness measure."""
    import torch

    from train.augment import RobustAugment
    from train.models import sharpness

    aug = RobustAugment(p_disk=1.0, blur_disk=(radius, radius))
    rnd = lambda *shape: torch.rand(shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
    point = torch.zeros(1, 3, 17, 17)
    point[..., 8, 8] = 1.0
    z = aug._disk(point, point.clone(), torch.ones(1, dtype=torch.bool), rnd)[0, 0]
    assert float(z.sum()) == pytest.approx(1.0, abs=1e-5)
    yy, xx = torch.nonzero(z > 0, as_tuple=True)
    assert float(((yy - 8) ** 2 + (xx - 8) ** 2).float().sqrt().max()) <= radius + 0.5 + 1e-6
    inner = z[8, 8 + int(radius) - 1] if radius >= 1 else z[8, 8]
    assert float(inner) == pytest.approx(float(z[8, 8]))  # flat inside, unlike a Gaussian

    paths = sorted(p for p in pbc_sample.rglob("*.jpg"))[:8]
    x = torch.stack([torch.from_numpy(np.asarray(Preprocessing(input_size=64).apply(load_rgb(p)))).permute(2, 0, 1)
                     for p in paths]).float() / 255
    y = aug._disk(x, x.clone(), torch.ones(len(x), dtype=torch.bool), rnd)
    assert (sharpness(y) < 0.8 * sharpness(x)).all()
