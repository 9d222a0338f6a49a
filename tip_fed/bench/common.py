"""Shared helpers of the benchmark suite: timing, memory, machine description, the test model.

Memory is measured per process from the kernel (``/proc/self/status`` VmHWM for a process's own
peak, VmRSS summed over a process tree for runs that spawn workers), so numbers do not depend on
allocator-specific hooks and cover native (SEAL, BLAS) allocations. Not ``ru_maxrss``: Linux
carries the parent's resident size at fork into a child's ``ru_maxrss`` across ``exec``, so a
worker spawned by a large process would report the parent's size as its own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: The GPT-2-style model the gradient and seller benchmarks use (issue: >= 4 layers, width
#: >= 256, sequence 128; a small vocabulary keeps the embedding out of the picture).
GPT2_CONFIG: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 4,
    "n_embd": 256,
    "n_head": 4,
    "n_positions": 128,
    "vocab_size": 1000,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
SEQ_LEN = 128
#: Projected layers: every Conv1D inside the transformer blocks (16 layers); rank 8 x 8 gives
#: k = 16 * 64 = 1024, the dimension the packing benchmark uses.
GPT2_INCLUDE = ("transformer.h.*",)
GPT2_RANK = 8


def bench_args(doc: str | None, quick: str) -> argparse.Namespace:
    """A benchmark script's command line: ``--out FILE`` (required) and ``--quick`` (``quick`` says what it runs)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap.parse_args()


def write_result(result: dict[str, Any], out: str | Path, shown: str | None = None) -> Path:
    """Write a benchmark's ``result`` as JSON to ``out`` (parents created); print its ``shown`` block."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if shown is not None:
        print(json.dumps(result[shown], indent=2))
    return path


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Result and wall seconds of one call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def gpt2_model(seed: int = 0) -> torch.nn.Module:
    """The benchmark's GPT-2-style causal LM, deterministic weights, eval mode."""
    from tip_fed.core.models import build

    torch.manual_seed(seed)
    model = build("transformers", {"model_class": "GPT2LMHeadModel", "config": dict(GPT2_CONFIG)})
    return model.eval()


def token_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random full-length sequences (no padding) for the causal-LM task."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPT2_CONFIG["vocab_size"], (n, SEQ_LEN), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def current_rss_mb() -> float:
    """Resident set size of this process now (VmRSS)."""
    return _vm_rss_kb(os.getpid()) / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space so far (VmHWM)."""
    hwm = _status_kb(os.getpid(), "VmHWM:")
    return (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _vm_rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS:")


def tree_rss_mb(root: int) -> float:
    """Summed VmRSS of ``root`` and all its descendants (Ray workers included)."""
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    return sum(_vm_rss_kb(p.pid) for p in procs) / 1024


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, memory, load, accelerator."""
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(mem_kb / 1024**2, 1),
        "load_avg_1m": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def versions() -> dict[str, str]:
    """Versions of everything that sets the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("tip-fed", "tenseal", "torch", "transformers", "numpy", "flwr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
