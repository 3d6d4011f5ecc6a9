"""DDP plumbing: process group and device, barriers, and decoding the dataset once per node."""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("train")

# Followers wait at a barrier while their node's first process decodes the whole dataset (minutes for a large
# one): the default NCCL timeout (10 min) would kill them.
DDP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_leader(self) -> bool:
        """The first process on its machine: extracts and decodes the data for the others there."""
        return self.local_rank == 0


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process.

    On CUDA the process binds its GPU (LOCAL_RANK) before the process group exists, so NCCL and every barrier
    use that GPU and not GPU 0 (a barrier before set_device makes every rank create a context on GPU 0).
    """
    import torch

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend, timeout=DDP_TIMEOUT)
    return Dist(torch.distributed.get_rank(), ws, local_rank, backend)


def barrier(dist: Dist) -> None:
    """All ranks wait here; a no-op for one process. NCCL is told the rank's own GPU."""
    import torch

    if dist.world_size == 1:
        return
    if dist.backend == "nccl":
        torch.distributed.barrier(device_ids=[dist.local_rank])
    else:
        torch.distributed.barrier()


def leader_first(dist: Dist, fn: Callable[[], object]) -> object:
    """fn() on the node leader, then (after a barrier) on the other ranks of the node: e.g. extracting a .zip
    into a shared cache folder once, which the others then find complete. Every rank passes one barrier."""
    if dist.world_size == 1:
        return fn()
    if dist.node_leader:
        out = fn()
        barrier(dist)
        return out
    barrier(dist)
    return fn()


def decode_once(dist: Dist, folder: Path, build: Callable[[], "object"]):
    """The training ImageCache, decoded by the node leader only and memory-mapped by the other ranks.

    build() decodes (train.data.ImageCache.build). Under DDP the leader writes the arrays as .npy files into
    `folder` (atomically, then re-opens them memory-mapped so its own copy is the page cache's), the others
    wait at a barrier and memory-map the same files: one decode and one copy in RAM per machine instead of one
    per GPU. The folder is removed once every rank has opened the files (open maps outlive the unlink).
    """
    from train.data import ImageCache

    if dist.world_size == 1:
        return build()
    folder = Path(folder) / f".decoded.{socket.gethostname()}"
    if dist.node_leader:
        cache = build()
        _save_cache(cache, folder)
        barrier(dist)
        cache = _load_cache(folder, ImageCache)
    else:
        barrier(dist)
        cache = _load_cache(folder, ImageCache)
        log.info("rank %d: %d decoded training images memory-mapped from %s", dist.rank, len(cache), folder)
    barrier(dist)
    if dist.node_leader:
        shutil.rmtree(folder, ignore_errors=True)
    return cache


def _save_cache(cache, folder: Path) -> None:
    from cellcore.files import atomic_write, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"images": cache.images, "labels": cache.labels}
    if cache.sources is not None:
        arrays["sources"] = cache.sources
    for name, arr in arrays.items():
        atomic_write(folder / f"{name}.npy", lambda fh, a=arr: np.save(fh, a))
    # meta last: its presence means the arrays beside it are complete
    atomic_write_text(folder / "meta.json", json.dumps({"paths": cache.paths, "classes": cache.classes,
                                                        "skipped": cache.skipped}))


def _load_cache(folder: Path, cls):
    meta = json.loads((folder / "meta.json").read_text())
    load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
    return cls(images=load("images"), labels=np.asarray(load("labels")), paths=meta["paths"],
               classes=meta["classes"], skipped=[tuple(s) for s in meta["skipped"]],
               sources=load("sources") if (folder / "sources.npy").exists() else None)
