"""MixStyle: mixes early feature statistics between training images, so a stain or camera "style" is not a class cue.

Zhou et al., "Domain Generalization with MixStyle" (ICLR 2021): the per-image, per-channel mean and standard
deviation of an early convolutional layer's output carry a picture's style (colour, contrast, texture statistics)
more than its content. Training sometimes renormalises an image's features to a mix of its own statistics and
another image's, so the network cannot lean on them. It is a training-time hook only: it changes no weight and
no shape, is the identity in eval mode, and never reaches a checkpoint or an exported graph.

Here each image is mixed with probability `p` (per image, not per batch as in the paper: no host sync, one graph
for torch.compile), with a partner from a random permutation of the batch and a weight lambda ~ Beta(alpha, alpha).
"""
from __future__ import annotations

import torch
from torch import nn

# Where the style lives: the stem and the first two stages, all plain convolutions (at 64 px input: 32, 32 and 16 px
# maps). Later stages hold the transformer blocks and class content. The paper's ResNet setting is res1-res3.
MIXSTYLE_LAYERS = {
    "mobilevit_xxs": ("backbone.stem", "backbone.stages.0", "backbone.stages.1"),
    "mobilevit_xs": ("backbone.stem", "backbone.stages.0", "backbone.stages.1"),
    "mobilevit_s": ("backbone.stem", "backbone.stages.0", "backbone.stages.1"),
}


def mixstyle(x: torch.Tensor, p: float, alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """x: [B, C, H, W] features -> the same shape, each image's channel statistics mixed with probability p."""
    b = x.shape[0]
    if b < 2 or p <= 0:
        return x
    mu = x.mean(dim=(2, 3), keepdim=True)                                   # [B, C, 1, 1]
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()  # as the paper: no gradient through the statistics
    beta = torch.distributions.Beta(torch.tensor(alpha, device=x.device), torch.tensor(alpha, device=x.device))
    lam = beta.sample((b,)).view(b, 1, 1, 1).to(x.dtype)
    lam = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < p, lam, torch.ones_like(lam))  # 1: unchanged
    perm = torch.randperm(b, device=x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (x - mu) / sig * sig_mix + mu_mix


def attach_mixstyle(model: nn.Module, arch: str, p: float, alpha: float = 0.1) -> list:
    """Register MixStyle forward hooks on `arch`'s early layers of `model` (a train.models.Classifier).

    Returns the hook handles (call .remove() to detach). Active only while the module is in training mode.
    """
    if arch not in MIXSTYLE_LAYERS:
        raise ValueError(f"MixStyle has no layer list for {arch!r}; valid: {', '.join(MIXSTYLE_LAYERS)}")
    modules = dict(model.named_modules())

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return mixstyle(output, p, alpha) if module.training else output

    handles = []
    for name in MIXSTYLE_LAYERS[arch]:
        if name not in modules:
            raise ValueError(f"{arch}: no module {name!r} to attach MixStyle to")
        handles.append(modules[name].register_forward_hook(hook))
    return handles
