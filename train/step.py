"""The optimisation step on any device: precision choice, torch.compile, device-side epoch meters, batch gathering."""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("train")

COMPILE_SETTINGS = ("auto", "on", "off")
AMP_DTYPES = ("auto", "bf16", "fp16")
# Share of the free GPU memory the uint8 training cache may take to live on the GPU (the rest: model,
# activations, optimizer, cuDNN workspaces). Above it batches are gathered in pinned host memory instead.
RESIDENT_SHARE = 0.5


# ----------------------------------------------------------------------------- choices

@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: fp32, or autocast to bf16, or autocast to fp16 with a GradScaler."""

    name: str  # fp32 | bf16 | fp16

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"

    @property
    def scaler(self) -> bool:
        """fp16's 5-bit exponent underflows small gradients: scale the loss up, unscale before the step."""
        return self.name == "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def choose_precision(device_type: str, amp: bool, amp_dtype: str = "auto",
                     capability: tuple[int, int] | None = None) -> Precision:
    """The mixed precision to train with. capability: the CUDA card's (major, minor) compute capability.

    auto: bf16 only where the card computes it natively (compute capability >= 8.0: A100, H100, RTX 30xx
    and later), fp16 with a GradScaler on older cards (T4 7.5, V100 7.0), whose
    torch.cuda.is_bf16_supported() is True too because bf16 is emulated there (slowly, through fp32).
    On CPU auto is fp32, as always. An explicit bf16/fp16 is honoured on any device (fp16 on CPU runs the
    GradScaler path, which the tests use).
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"unknown amp_dtype {amp_dtype!r}; valid: {', '.join(AMP_DTYPES)}")
    if not amp:
        return Precision("fp32")
    if amp_dtype != "auto":
        if amp_dtype == "bf16" and device_type == "cuda" and capability is not None and capability < (8, 0):
            log.warning("bf16 asked for on a card of compute capability %d.%d: it is emulated there (slow); "
                        "--amp-dtype auto would use fp16 + GradScaler", *capability)
        return Precision(amp_dtype)
    if device_type != "cuda":
        return Precision("fp32")
    return Precision("bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def resolve_compile(setting: str, device_type: str) -> bool:
    """--compile auto|on|off -> whether to torch.compile the model: auto is on for CUDA, off for CPU.

    On CPU compiling takes minutes and was not measured to pay for this model; on CUDA it was
    (issue 12: 2,650 -> 3,810 img/s for the model step of mobilevit_xs at 256 px, batch 128, H100).
    """
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"unknown compile setting {setting!r}; valid: {', '.join(COMPILE_SETTINGS)}")
    return setting == "on" or (setting == "auto" and device_type == "cuda")


def make_optimizer(model: torch.nn.Module, cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD with no weight decay on norms and biases (1-D parameters): standard for ViTs and CNNs.

    fused: one kernel for the whole update (CUDA AdamW/Adam); it also takes the GradScaler's inf check on the
    device, where the unfused path reads it back to the host every step.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    extra = {"fused": True} if fused else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **extra)
    return torch.optim.AdamW(groups, lr=cfg.lr, **extra)


# ----------------------------------------------------------------------------- the step

class TrainStep:
    """zero_grad, forward under autocast, cross-entropy, (scaled) backward, optimizer step; no host sync.

    Returns (loss [] float32, logits [B, C]) still on the device, detached. With compile, the model is
    torch.compile'd for batches of exactly `static_batch` images (dynamic=False: one static graph); any other
    size (the last, partial batch of an epoch) runs the same module eagerly, which costs one eager step per
    epoch instead of a second compile (about a minute). The first step of each kind is timed (with a device
    sync) and logged: for the compiled one that is the compile time.

    check_now: raise FloatingPointError before the backward when the loss is not finite (a host sync per
    step: what the loop does on CPU, where syncs are free); without it the caller checks its EpochMeter.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 precision: Precision, device: torch.device, compile: bool = False, static_batch: int = 0,
                 label_smoothing: float = 0.0, backend="inductor", check_now: bool = False,
                 compile_setting: str = "auto", grad_clip: float = 0.0):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.grad_clip = grad_clip
        self.precision, self.device, self.label_smoothing = precision, device, label_smoothing
        self.static_batch, self.check_now, self.compile_setting = static_batch, check_now, compile_setting
        self.compiled = torch.compile(model, backend=backend, dynamic=False) if compile else None
        self.first_step_s: dict[str, float] = {}  # "compiled"/"eager" -> seconds of the first such step
        self.calls = 0

    def forward_loss(self, fwd, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.precision.dtype, enabled=self.precision.autocast):
            logits = fwd(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 3, S, S] float in 0..1 on the device, y: [B] int64 (or [B, C] float class probabilities, as
        mixup_batch makes them) -> (loss, logits), both detached."""
        kind = "compiled" if self.compiled is not None and x.shape[0] == self.static_batch else "eager"
        first = kind not in self.first_step_s
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if kind == "compiled" and first:
            try:
                loss, logits = self._fwd_bwd(self.compiled, x, y, where)
            except FloatingPointError:
                raise
            except Exception as exc:  # noqa: BLE001 - compile failures have many types; on auto we train eagerly
                if self.compile_setting == "on":
                    raise
                log.warning("torch.compile failed (%s: %s); training eagerly (--compile off avoids this try)",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.compiled, kind = None, "eager"
                first = kind not in self.first_step_s
                self.optimizer.zero_grad(set_to_none=True)
                loss, logits = self._fwd_bwd(self.model, x, y, where)
        else:
            loss, logits = self._fwd_bwd(self.compiled if kind == "compiled" else self.model, x, y, where)
        if self.grad_clip > 0:
            # one bad batch of heavily augmented images must not throw the transformer blocks off (a cpu-preset
            # run diverged at lr ~1.7e-3 without it); unscale first so the norm is the true gradient's.
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.calls += 1
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_step_s[kind] = dt = time.perf_counter() - t0
            log.info("first %s training step (batch %d%s) took %.1f s", kind, x.shape[0],
                     ", torch.compile: tracing and compiling" if kind == "compiled" else "", dt)
        return loss.detach(), logits.detach()

    def _fwd_bwd(self, fwd, x, y, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.forward_loss(fwd, x, y)
        if self.check_now and not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at {where}; lower --lr")
        self.scaler.scale(loss).backward()
        return loss, logits


class EpochMeter:
    """Loss x batch size, correct predictions and non-finite losses of one epoch, summed on the device.

    add() queues three tiny kernels and never waits for the GPU; read() copies the three sums to the host
    once. The arithmetic is the old per-step `loss.item() * n` in float64 and an exact integer count, so
    on CPU the epoch's loss and accuracy are bit-for-bit what they were.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0  # batch sizes are known on the host

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """loss: [] float32, logits: [B, C], y: [B] int64, all on the device."""
        n = int(y.shape[0])
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.argmax(1) == y).sum()
        self.nonfinite += (~torch.isfinite(loss)).long()
        self.seen += n

    def read(self) -> tuple[float, float, int]:
        """-> (mean loss, accuracy, number of non-finite losses) so far: one device-to-host copy."""
        loss_sum, correct, bad = torch.stack([self.loss_sum, self.correct.double(), self.nonfinite.double()]).tolist()
        seen = max(self.seen, 1)
        return loss_sum / seen, correct / seen, int(bad)


# ----------------------------------------------------------------------------- batches

class TrainBatches:
    """Where training batches come from: the decoded uint8 cache, gathered by the sampler's indices.

    CPU: exactly the old path (index the [N, 3, S, S] view, scale to 0..1). CUDA, when the cache fits in
    RESIDENT_SHARE of the free GPU memory: the cache ([N, S, S, 3] uint8, plus the [N, kS, kS, 3] sources of
    a zooming augmentation) is copied to the GPU once and each batch is an index_select there, by an index
    tensor moved once per epoch: no host work or transfer per step. Otherwise each batch is gathered on the
    host into pinned memory and copied without blocking (the caching host allocator keeps the buffer alive
    until the copy has run).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sources: np.ndarray | None, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"
        with warnings.catch_warnings():
            # under DDP the cache is memory-mapped read-only (train.distributed.decode_once); it is only ever read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            # NHWC as decoded; permute(0, 3, 1, 2) gives the [N, 3, S, S] view (channels_last strides), no copy
            self.x = torch.from_numpy(np.asarray(images))
            self.src = torch.from_numpy(np.asarray(sources)) if sources is not None else None
            self.y = torch.from_numpy(np.asarray(labels))
        self.resident = False
        if self.on_gpu:
            need = self.x.nbytes + (self.src.nbytes if self.src is not None else 0) + self.y.nbytes
            free, _ = torch.cuda.mem_get_info(device)
            self.resident = need <= RESIDENT_SHARE * free
            if self.resident:
                self.x, self.y = self.x.to(device), self.y.to(device)
                self.src = self.src.to(device) if self.src is not None else None
            log.info("training images %s: %.2f GB uint8 (%.1f GB free on the GPU)",
                     "resident on the GPU" if self.resident else "gathered in pinned host memory per batch",
                     need / 1e9, free / 1e9)

    def __len__(self) -> int:
        return len(self.y)

    def epoch_order(self, order: torch.Tensor) -> torch.Tensor:
        """The epoch's sample indices [M] int64 (CPU) -> where batches are gathered from (moved once)."""
        if self.resident:
            return order.to(self.device)  # once per epoch, when the GPU has nothing queued: a blocking copy is free
        return order

    def batch(self, order: torch.Tensor, lo: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> x [n, 3, S, S] float32 in 0..1, y [n] int64, src [n, 3, kS, kS] float32 in 0..1 or None; on the device."""
        idx = order[lo:lo + n]
        if not self.on_gpu:  # the CPU loop as it always was (bit-identical numerics)
            nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
            x = nchw(self.x)[idx].float().div_(255)
            src = nchw(self.src)[idx].float().div_(255) if self.src is not None else None
            return x, self.y[idx], src
        if self.resident:
            pick = lambda t: t.index_select(0, idx)  # noqa: E731
        else:
            def pick(t: torch.Tensor) -> torch.Tensor:
                buf = torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                torch.index_select(t, 0, idx, out=buf)
                return buf.to(self.device, non_blocking=True)
        # [n, S, S, 3] uint8 -> [n, 3, S, S] view with channels_last strides -> float32 in 0..1 (same strides)
        x = pick(self.x).permute(0, 3, 1, 2).float().div_(255)
        src = pick(self.src).permute(0, 3, 1, 2).float().div_(255) if self.src is not None else None
        return x, pick(self.y), src


def augment_batch(x: torch.Tensor, src: torch.Tensor | None, augment, channels_last: bool) -> torch.Tensor:
    """[n, 3, S, S] float32 0..1 (+ the [n, 3, kS, kS] sources of zooming augmentations) -> the model's input."""
    if src is not None:
        x = augment(x, src)
    elif augment is not None:
        x = augment(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mixup_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): blend the batch with a shuffled copy of itself, and the one-hot targets alike.

    x: [n, 3, S, S] float (the augmented model input), y: [n] int64 -> ([n, 3, S, S], [n, C] float32 summing to 1).
    One weight per batch, lam ~ Beta(alpha, alpha), drawn on x's device from torch's generator (seeded per epoch by
    the loop), so a GPU never waits for the host. Blends of two cells are not pictures any lab takes; what mixup
    buys is a classifier that changes linearly between classes instead of jumping, i.e. less confident far from
    the training pictures, which is what another lab's cells are.
    """
    a = torch.tensor(float(alpha), device=x.device)
    lam = torch.distributions.Beta(a, a).sample()  # [] float32
    perm = torch.randperm(x.shape[0], device=x.device)
    onehot = F.one_hot(y, num_classes).to(torch.float32)  # [n, C]
    mixed = lam * x + (1 - lam) * x[perm]
    if x.is_contiguous(memory_format=torch.channels_last):
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    return mixed, lam * onehot + (1 - lam) * onehot[perm]
