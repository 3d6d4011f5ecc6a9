"""Class-balanced sampling: torchsampler's sampler on one process, a sharded equivalent under DDP."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """weight 1/count(class) per sample: every class is drawn equally often in expectation."""
    counts = np.bincount(labels)
    return torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)


def make_sampler(labels: np.ndarray, rank: int = 0, world_size: int = 1, seed: int = 0) -> Sampler:
    if world_size == 1:
        from torchsampler import ImbalancedDatasetSampler

        # torchsampler 0.1.2 guesses labels wrongly for Subset/DatasetFolder: always pass them.
        lab = labels.tolist()
        return ImbalancedDatasetSampler(lab, labels=lab, num_samples=len(lab))
    return DistributedBalancedSampler(labels, rank, world_size, seed)


class DistributedBalancedSampler(Sampler[int]):
    """One balanced stream per epoch (same seed on every rank); rank r takes items r, r+W, r+2W, ...

    So the ranks' shares are disjoint and together are exactly what ImbalancedDatasetSampler
    would draw on one process. Call set_epoch(e) before each epoch, as with DistributedSampler.
    """

    def __init__(self, labels: np.ndarray, rank: int, world_size: int, seed: int = 0):
        self.weights = balanced_weights(np.asarray(labels))
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.num_samples = math.ceil(len(labels) / world_size)
        self.total = self.num_samples * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.multinomial(self.weights, self.total, replacement=True, generator=g)

    def __iter__(self):
        return iter(self.stream()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
