"""The GPU-minded training step, checked on CPU: precision choice, compile setting, device-side meters, batch
gathering, the sync-free dihedral and the background checkpoint writer."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.step import EpochMeter, Precision, TrainBatches, TrainStep, choose_precision, resolve_compile


@pytest.mark.parametrize("device,amp,amp_dtype,capability,expected", [
    ("cuda", True, "auto", (9, 0), "bf16"),   # H100
    ("cuda", True, "auto", (8, 0), "bf16"),   # A100
    ("cuda", True, "auto", (8, 6), "bf16"),   # RTX 30xx
    ("cuda", True, "auto", (7, 5), "fp16"),   # T4: is_bf16_supported() is True, but bf16 is emulated
    ("cuda", True, "auto", (7, 0), "fp16"),   # V100: likewise
    ("cuda", False, "auto", (9, 0), "fp32"),  # --amp false
    ("cuda", True, "fp16", (9, 0), "fp16"),   # forced
    ("cuda", True, "bf16", (7, 5), "bf16"),   # forced (with a warning)
    ("cpu", True, "auto", None, "fp32"),      # CPU trains in fp32 as always
    ("cpu", True, "fp16", None, "fp16"),      # explicit: the GradScaler path on CPU (tests)
    ("cpu", False, "fp16", None, "fp32"),
])
def test_precision_choice(device: str, amp: bool, amp_dtype: str, capability, expected: str) -> None:
    p = choose_precision(device, amp, amp_dtype, capability)
    assert p.name == expected
    assert p.scaler == (expected == "fp16") and p.autocast == (expected != "fp32")
    assert p.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_precision_choice_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="valid: auto, bf16, fp16"):
        choose_precision("cuda", True, "fp8", (9, 0))


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("on", "cuda", True),
    ("off", "cuda", False), ("off", "cpu", False)])
def test_compile_setting_resolves(setting: str, device: str, expected: bool) -> None:
    assert resolve_compile(setting, device) is expected


def test_compile_and_amp_dtype_are_config_fields() -> None:
    from train.config import get_args_parser, resolve_config

    def parse(*flags: str):
        return resolve_config(get_args_parser().parse_args(["--data", "x", "--preset", "paper", *flags]))

    cfg = parse()
    assert (cfg.compile, cfg.amp_dtype) == ("auto", "auto")
    cfg = parse("--compile", "off", "--amp-dtype", "fp16", "--augment", "dihedral")
    assert (cfg.compile, cfg.amp_dtype, cfg.augment, cfg.arch, cfg.image_size) == ("off", "fp16", "dihedral",
                                                                                   "mobilevit_xs", 256)
    for flag, value in (("--compile", "maybe"), ("--amp-dtype", "fp8")):
        with pytest.raises(ValueError, match="valid: "):
            parse(flag, value)
    help_text = " ".join(get_args_parser().format_help().split())
    assert "--compile COMPILE torch.compile the model (auto: on for CUDA, off for CPU)" in help_text


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _step(model: torch.nn.Module, compile: bool, backend="eager", precision: str = "fp32") -> TrainStep:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    return TrainStep(model, opt, scaler, Precision(precision), torch.device("cpu"), compile=compile, static_batch=4,
                     backend=backend, check_now=True, compile_setting="on")


def test_train_step_compiles_the_full_batch_once_and_runs_the_partial_batch_eagerly() -> None:
    compiled_shapes: list[tuple] = []

    def counting_backend(gm, example_inputs):  # a torch.compile backend that records each compilation
        compiled_shapes.append(tuple(t.shape for t in example_inputs if isinstance(t, torch.Tensor))[:1])
        return gm.forward

    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (4, 4, 3, 4)]
    eager, compiled = _step(_tiny(), compile=False), _step(_tiny(), compile=True, backend=counting_backend)
    for x, y in batches:
        le, _ = eager(x, y)
        lc, _ = compiled(x, y)
        assert torch.allclose(le, lc, atol=1e-6), "compiled and eager steps must train the same model"
    assert len(compiled_shapes) == 1, f"expected one compilation (batch 4), got {compiled_shapes}"
    assert set(compiled.first_step_s) == {"compiled", "eager"} and eager.first_step_s.keys() == {"eager"}
    assert compiled.calls == 4


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grad_clip_bounds_the_update_to_the_clipped_gradient(precision: str) -> None:
    """With SGD (lr 1, no momentum) the update *is* the gradient: its global norm must equal the clip (the
    unclipped gradient of a huge-scaled input is far larger); with fp16 the GradScaler's scale is removed first."""
    def run(clip: float) -> float:
        model = _tiny()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        # init_scale 1024: the default 65536 overflows fp16 on this input and the scaler skips the step
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=precision == "fp16")
        step = TrainStep(model, opt, scaler, Precision(precision), torch.device("cpu"), check_now=True,
                         grad_clip=clip)
        before = [p.detach().clone() for p in model.parameters()]
        g = torch.Generator().manual_seed(0)
        step(torch.rand(4, 3, 8, 8, generator=g) * 100, torch.tensor([0, 1, 2, 0]))
        return torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, model.parameters()))).item()

    unclipped, clipped = run(0.0), run(0.5)
    assert unclipped > 2.0, unclipped
    assert clipped == pytest.approx(0.5, rel=1e-3)


def test_train_step_raises_on_a_non_finite_loss_before_the_update() -> None:
    model = _tiny()
    step = _step(model, compile=False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="at epoch 3 step 1; lower --lr"):
        step(torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), where="epoch 3 step 1")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_epoch_meter_equals_per_step_item_accumulation() -> None:
    """The device-side sums give exactly the old loop's `loss.item() * n` float sum and correct count."""
    g = torch.Generator().manual_seed(0)
    meter, loss_sum, correct, seen = EpochMeter(torch.device("cpu")), 0.0, 0, 0
    for n in (16, 16, 16, 7):
        logits, y = torch.randn(n, 8, generator=g), torch.randint(0, 8, (n,), generator=g)
        loss = F.cross_entropy(logits, y)
        meter.add(loss, logits, y)
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
    assert meter.read() == (loss_sum / seen, correct / seen, 0) and meter.seen == seen
    meter.add(torch.tensor(float("inf")), torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))
    assert meter.read()[2] == 1


def test_gpu_style_gather_equals_the_cpu_path() -> None:
    """The resident-GPU gather (index_select on NHWC, permute, /255) is exercised on CPU against the old path."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    sources = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 10).astype(np.int64)
    cpu = TrainBatches(images, labels, sources, torch.device("cpu"))
    gpu_style = TrainBatches(images, labels, sources, torch.device("cpu"))
    gpu_style.on_gpu = gpu_style.resident = True  # take the device branch, on CPU tensors
    order = torch.tensor([3, 3, 9, 0, 5, 1, 7])
    old_x = torch.from_numpy(images).permute(0, 3, 1, 2)[order[2:6]].float().div_(255)
    for got in (cpu.batch(cpu.epoch_order(order), 2, 4), gpu_style.batch(gpu_style.epoch_order(order), 2, 4)):
        x, y, src = got
        assert x.shape == (4, 3, 6, 6) and src.shape == (4, 3, 12, 12)
        assert torch.equal(x, old_x) and torch.equal(y, torch.from_numpy(labels)[order[2:6]])
        assert torch.equal(src, torch.from_numpy(sources).permute(0, 3, 1, 2)[order[2:6]].float() / 255)


def test_sync_free_dihedral_equals_the_masked_one() -> None:
    from train.augment import dihedral

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 9, 9, generator=g)
    k, mirror = torch.randint(0, 4, (64,), generator=g), (torch.rand(64, generator=g) < 0.5).view(64, 1, 1, 1)
    masked, sync_free = dihedral(x, k, mirror, sync_free=False), dihedral(x, k, mirror, sync_free=True)
    assert torch.equal(masked, sync_free)
    assert torch.equal(sync_free[k.eq(0) & ~mirror.view(-1)], x[k.eq(0) & ~mirror.view(-1)])
    i = int(torch.nonzero(k.eq(1) & mirror.view(-1))[0])
    assert torch.equal(sync_free[i], torch.rot90(x[i].flip(-1), 1, dims=(-2, -1)))


def test_background_writer_runs_jobs_in_order_off_the_caller_and_reports_errors(tmp_path: Path) -> None:
    from train.checkpoint import BackgroundWriter, snapshot

    live = {"w": torch.zeros(3)}
    frozen = snapshot(live)
    live["w"] += 1  # training goes on: the snapshot must not follow
    assert torch.equal(frozen["w"], torch.zeros(3))

    done: list[int] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def job(i: int) -> None:
        time.sleep(0.05)
        threads.add(threading.get_ident())
        done.append(i)

    w = BackgroundWriter(max_pending=1)
    t0 = time.perf_counter()
    w.submit(job, 1)
    assert time.perf_counter() - t0 < 0.04, "submit must not wait for the job"
    w.submit(job, 2)
    w.submit(job, 3)
    w.close()  # every job has run when close returns
    assert done == [1, 2, 3] and caller not in threads

    w = BackgroundWriter()
    w.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        w.flush()
    w.close()


@pytest.mark.parametrize("cpu_generator", [False, True], ids=["device_generator", "cpu_generator"])
def test_a_gpu_step_never_reads_device_values_back(cpu_generator: bool) -> None:
    """The data path, the augmentations of the paper and cpu presets and the epoch meter, run on the `meta` device:
    any host read of a device value (.item(), `if mask.any()`, boolean-mask indexing) fails there, as it would
    stall a GPU each step. Random numbers come from the device's generator or, when one is passed, a CPU one."""
    from train.augment import AUGMENTS

    meta = torch.device("meta")
    rng = np.random.default_rng(0)
    batches = TrainBatches(rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 3, None,
                           torch.device("cpu"))
    batches.on_gpu = batches.resident = True
    batches.device, batches.x, batches.y = meta, batches.x.to(meta), batches.y.to(meta)
    x, y, _ = batches.batch(batches.epoch_order(torch.tensor([4, 1, 1, 9, 0, 3])), 0, 4)
    assert x.device == meta and x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.device == meta
    g = torch.Generator().manual_seed(0) if cpu_generator else None
    for name in ("cells", "dihedral"):
        out = AUGMENTS[name](x, g)
        assert out.device == meta and out.shape == x.shape, name
    meter = EpochMeter(meta)
    meter.add(torch.empty((), device=meta), torch.empty(4, 3, device=meta), y)
    assert meter.seen == 4 and meter.loss_sum.device == meta
