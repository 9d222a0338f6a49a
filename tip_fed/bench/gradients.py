"""Hook-based projected gradients vs explicit per-sample full gradients, then projection.

Both methods produce the same ``[n, k]`` matrix for the same GPT-2-style model and batch:

- ``hooks``: :func:`tip_fed.core.gradients.projected_grads` - one batched forward/backward;
  forward hooks project activations, output gradients are projected, and the per-sample
  projected gradient is an einsum. No per-sample full gradient ever exists.
- ``full``: the way the paper's code works - for each sample, autograd gives the full weight
  gradient of every projected layer; all n full per-sample gradients are kept (materialised),
  then each is projected with the same matrices, ``P_out G P_in^T``.

Each method runs in a fresh subprocess so its memory high-water mark is its own: the figure is
VmHWM after the method minus the resident set (VmRSS) just before it (model and batch already
built), so it counts everything the method allocates (autograd graph, gradients, projections).
Time is the median of the timed repetitions after one warm-up call, with torch using every core.

Floors, timed in the hook worker's process at the hook batch size and interleaved with the hook
method (so load drifts hit all alike), reported as ``floor_<name>_seconds`` and
``hooks_over_<name>``:

- ``forward``: per-sample losses under ``no_grad``. Every method needs the loss, so
  ``max_speedup_forward_bound = full_seconds / floor_forward_seconds`` bounds any speedup.
- ``backprop``: forward + backward down to the lowest projected layer's output (the gradient
  of its bias; no weight gradients, no hooks): the hook method's own lower bound, since
  ``delta`` of every projected layer is needed.
- ``step``: one plain training step, forward + ``loss.backward()`` (every weight gradient).

The baseline costs about a forward and a backward *with* weight gradients per sample; the hook
method a forward and a backward *to activations* (plus ~5% for the projections). On 2 CPU cores
(n=100) the forward alone is about 1/3.5 of the baseline and the backprop floor about 1/1.65, so
the hook method's speedup cannot exceed ~1.7x here, and no method that evaluates the loss can
reach 5x; what the hook method saves is memory (no full per-sample gradient ever exists).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from tip_fed.core.gradients import projected_grads_batched
from tip_fed.core.projection import ProjectionSpec, projection_matrices
from tip_fed.core.tasks import get_task

from .common import GPT2_INCLUDE, GPT2_RANK, current_rss_mb, gpt2_model, median, peak_rss_mb, timed, token_batch

METHODS = ("hooks", "full")


def _spec(model: torch.nn.Module) -> ProjectionSpec:
    return ProjectionSpec.for_model(model, rank=GPT2_RANK, seed=0, include=list(GPT2_INCLUDE))


def full_then_project(model: torch.nn.Module, spec: ProjectionSpec, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Baseline: materialise every sample's full layer gradients, then project them."""
    task = get_task("causal-lm")
    modules = dict(model.named_modules())
    layers = [modules[layer.name] for layer in spec.layers]
    # a layer with bias is projected as [W | b] (the bias is the gradient's last input column)
    params = [
        p
        for layer, m in zip(spec.layers, layers, strict=True)
        for p in ([m.weight, m.bias] if layer.bias else [m.weight])
    ]
    n = batch["input_ids"].shape[0]
    full: list[list[torch.Tensor]] = []
    for i in range(n):
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        loss = task.per_sample_loss(model, sample)[0]
        grads = iter(g.detach() for g in torch.autograd.grad(loss, params))
        per_layer = []
        for layer, m in zip(spec.layers, layers, strict=True):
            w = next(grads)
            w = w.T if not isinstance(m, torch.nn.Linear) else w  # Conv1D stores [in, out]
            per_layer.append(torch.cat([w, next(grads)[:, None]], dim=1) if layer.bias else w)
        full.append(per_layer)
    out = torch.empty(n, spec.dim)
    offsets = spec.offsets()
    for j, layer in enumerate(spec.layers):
        p_in, p_out = projection_matrices(spec, layer, torch.float32)
        start = offsets[j]
        for i in range(n):
            out[i, start : start + layer.dim] = (p_out @ full[i][j] @ p_in.T).reshape(-1)
    return out


Batch = dict[str, torch.Tensor]


def _chunks(batch: Batch, size: int) -> list[Batch]:
    """The data in batches of ``size`` (memory bounded by the batch, not n)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _forward_floor(model: torch.nn.Module, spec: ProjectionSpec, chunks: list[Batch]) -> None:
    """Per-sample losses only, no graph: what any method must at least spend."""
    task = get_task("causal-lm")
    with torch.no_grad():
        for chunk in chunks:
            task.per_sample_loss(model, chunk)


def _backprop_floor(model: torch.nn.Module, spec: ProjectionSpec, chunks: list[Batch]) -> None:
    """Forward + backward to the lowest projected layer's output, via its bias's gradient."""
    task = get_task("causal-lm")
    bias = dict(model.named_modules())[spec.layers[0].name].bias
    for chunk in chunks:
        torch.autograd.grad(task.per_sample_loss(model, chunk).sum(), bias)


def _step_floor(model: torch.nn.Module, spec: ProjectionSpec, chunks: list[Batch]) -> None:
    """One plain training step per batch: forward + ``loss.backward()`` (all weight gradients)."""
    task = get_task("causal-lm")
    for chunk in chunks:
        task.per_sample_loss(model, chunk).sum().backward()
        model.zero_grad(set_to_none=True)


FLOORS = {"forward": _forward_floor, "backprop": _backprop_floor, "step": _step_floor}


def _worker(method: str, n: int, reps: int, size: int) -> dict[str, Any]:
    """Time (median of ``reps`` after a warm-up) and peak memory of one method, fresh process.

    The hook worker also times the floors at its batch size, interleaved with the hook method;
    peak memory is the method's own (its first call, before any floor runs).
    """
    torch.manual_seed(0)
    model = gpt2_model()
    spec = _spec(model)
    batch = token_batch(n)
    chunks = _chunks(batch, size)
    fns: dict[str, Callable[[], Any]] = {"full": lambda: full_then_project(model, spec, batch)}
    if method == "hooks":
        fns = {"hooks": lambda: projected_grads_batched(model, spec, "causal-lm", chunks)}
        fns.update({name: functools.partial(floor, model, spec, chunks) for name, floor in FLOORS.items()})
    base = current_rss_mb()
    out, first = timed(fns[method])
    peak = peak_rss_mb() - base
    for name, fn in fns.items():  # warm-up of the floors (the method itself is warm already)
        if name != method:
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn)[1])
    result = {
        "method": method,
        "n": n,
        "batch": size,
        "dim": spec.dim,
        "seconds": median(times[method]) if reps else first,
        "seconds_all": times[method],
        "peak_mb": peak,
        "output": out.tolist(),
    }
    for name in FLOORS if method == "hooks" and reps else ():
        result[f"floor_{name}_seconds"] = median(times[name])
        result[f"hooks_over_{name}"] = median([h / f for h, f in zip(times["hooks"], times[name], strict=True)])
    return result


def _spawn(method: str, n: int, reps: int, size: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "tip_fed.bench.gradients",
        "--worker",
        method,
        "--n",
        str(n),
        "--reps",
        str(reps),
        "--batch",
        str(size),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"gradient benchmark worker {method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict[str, Any]:
    """The ``gradients`` section: speed and peak-memory ratios, and that outputs agree.

    ``n`` is a seller's whole data set (100 samples, as in the scale benchmark): the baseline
    holds n full per-sample gradients, the hook method one batch of activations. The headline
    uses the hook batch size fixed here in advance (4); the other sizes are listed under
    ``hooks_by_batch`` to show the speed/memory trade-off. Why 4 (2 cores, n=100): batch 2 is
    ~9% slower (per-op overhead) at ~0.05 of the baseline's memory, batch 8 ~4% faster at
    ~0.14; 4 is within 5% of the best speed while staying under a tenth of the memory.
    """
    n, reps, rounds, sizes, head = (8, 1, 1, (2,), 2) if quick else (100, 3, 2, (2, 4, 8), 4)
    hooks: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
    full: list[dict[str, Any]] = []
    for _ in range(rounds):  # alternate, so load drifts hit both methods
        for b in sizes:
            hooks[b].append(_spawn("hooks", n, reps, b))
        full.append(_spawn("full", n, reps, head))
    a = torch.tensor(hooks[head][-1]["output"])
    b_out = torch.tensor(full[-1]["output"])
    for r in [*full, *(r for runs in hooks.values() for r in runs)]:
        r.pop("output", None)
    t_full = median([r["seconds"] for r in full])
    m_full = median([r["peak_mb"] for r in full])
    floors = [key for name in FLOORS for key in (f"floor_{name}_seconds", f"hooks_over_{name}")]
    by_batch = {
        str(b): {
            "seconds": median([r["seconds"] for r in runs]),
            "peak_mb": median([r["peak_mb"] for r in runs]),
            "speedup_vs_full": t_full / median([r["seconds"] for r in runs]),
            "memory_ratio": median([r["peak_mb"] for r in runs]) / m_full,
            **{key: median([r[key] for r in runs]) for key in floors},
        }
        for b, runs in hooks.items()
    }
    headline = by_batch[str(head)]
    return {
        "model": "GPT2LMHeadModel n_layer=4 n_embd=256 n_head=4 vocab=1000, seq 128, 16 projected Conv1D layers",
        "samples": n,
        "hooks_batch": head,
        "dim": full[0]["dim"],
        "torch_threads": torch.get_num_threads(),
        "hooks_seconds": by_batch[str(head)]["seconds"],
        "full_seconds": t_full,
        "hooks_peak_mb": by_batch[str(head)]["peak_mb"],
        "full_peak_mb": m_full,
        "speedup_vs_full": by_batch[str(head)]["speedup_vs_full"],
        "memory_ratio": by_batch[str(head)]["memory_ratio"],
        **{key: headline[key] for key in floors},
        "max_speedup_forward_bound": t_full / headline["floor_forward_seconds"],
        "hooks_by_batch": by_batch,
        "max_rel_diff": float((a - b_out).abs().max()) / float(b_out.abs().max()),
        "memory_method": "fresh subprocess per method; VmHWM after - VmRSS before (MiB)",
        "runs": {"full": full, **{f"hooks_b{b}": runs for b, runs in hooks.items()}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="gradient benchmark worker (one method, fresh process)")
    ap.add_argument("--worker", choices=METHODS, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="hook method's batch size")
    args = ap.parse_args()
    print(json.dumps(_worker(args.worker, args.n, args.reps, args.batch)))


if __name__ == "__main__":
    main()
