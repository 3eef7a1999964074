"""Refusing a ``--memory-size`` whose memories cannot fit on the device, before anything is
allocated."""

import logging
import os
from typing import Optional

import torch

from ..memory.bank import ChunkedMemoryBank
from .common import read_layers

logger = logging.getLogger(__name__)

_GIB = 2**30


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the host's available RAM
    (Linux MemAvailable; free pages elsewhere). None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory_fits(cfg, dims, task):
    """Refuse a --memory-size whose memories cannot fit on the device, before anything is
    allocated (the bank is built at the first batch, which would otherwise ask for it then)."""
    task_cfg = getattr(task, "cfg", None)
    rows = getattr(task_cfg, "batch_size", None)
    if cfg.disable_memory or not rows:
        return
    cuda = not getattr(task_cfg, "cpu", False) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    half = cuda and (getattr(task_cfg, "fp16", False) or getattr(task_cfg, "bf16", False))
    # training keeps a second memory for validation, which never reads training text
    banks = 1 if getattr(task, "building_from_checkpoint", False) else 2
    dtype = torch.float16 if half else torch.float32
    layers = len(read_layers(cfg, dims.num_layers)) or 1
    per_bank = layers * ChunkedMemoryBank.bytes_for(
        rows, dims.num_kv_heads, dims.head_dim, cfg.chunk_size, cfg.memory_size, dtype)
    free = free_bytes(device)
    if free is not None and banks * per_bank > free:
        what = "a training and a validation memory" if banks == 2 else "the memory"
        raise ValueError(
            f"--memory-size {cfg.memory_size} needs {banks * per_bank / _GIB:,.1f} GiB for {what} "
            f"({rows} streams (--batch-size) x {layers} memory layer(s) x {dims.num_kv_heads} "
            f"key-value heads x {cfg.memory_size} tokens "
            f"x {dims.head_dim} dims x keys and values, plus chunk means, in "
            f"{'16' if half else '32'}-bit floats, and chunk write times), more than the "
            f"{free / _GIB:,.1f} GiB free on {device}: lower --memory-size or --batch-size"
        )
    logger.info("memory: %.3f GiB per memory (%s, %d streams)", per_bank / _GIB, device, rows)
