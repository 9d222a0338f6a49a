"""Projected per-sample gradients from hooks, without ever forming a full per-sample gradient.

For a Linear / Conv1D layer with input activations ``a`` and output gradients
``delta = d(sum_i loss_i)/d(out)``, sample ``i``'s weight gradient is ``sum_t delta_it a_itᵀ``
(``[out, in]``; Conv1D's ``[in, out]`` weight is treated in the same ``[out, in]``
orientation). Its projection is

    G_i = P_out (sum_t delta_it a_itᵀ) P_inᵀ = sum_t (P_out delta_it)(P_in a_it)ᵀ,

so one forward hook (projected activations) and one gradient of the summed loss with respect
to the layer outputs (projected output gradients) give all ``G_i`` at the cost of a normal
backward pass. ``G_i`` is flattened row-major (``[rank_out, rank_in]``) and layers are
concatenated in spec order. Biases are not projected. Samples must not interact in the
forward pass (the model runs in eval mode, so dropout and batch-norm statistics are off);
padding then cannot change a sample's gradient, because padded positions get zero gradient.

KFAC statistics come from the same pass (see :class:`KfacStats` for the normalisation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from tip_fed.core.projection import ProjectionSpec, layer_dims, projection_matrices
from tip_fed.core.tasks import Task, batch_size, get_task
from tip_fed.errors import ConfigError, DataError, ModelError

__all__ = [
    "KfacStats",
    "kfac_statistics",
    "projected_grads",
    "projected_grads_batched",
    "projected_grads_with_kfac",
]

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class KfacStats:
    """Kronecker factors of one layer in projected space, kept as sums so they can be merged.

    ``activation_sum = sum over real tokens of (P_in a)(P_in a)ᵀ`` and ``num_tokens`` counts
    those tokens (positions with ``attention_mask == 0`` are skipped when the batch has one);
    ``gradient_sum = sum over samples and tokens of (P_out delta)(P_out delta)ᵀ`` and
    ``num_samples`` counts samples. So ``A = activation_sum / num_tokens`` is a per-token
    activation covariance and ``S = gradient_sum / num_samples`` a per-sample (token-summed)
    gradient covariance, and ``S ⊗ A`` approximates the projected empirical Fisher
    ``E_i[vec(G_i) vec(G_i)ᵀ]`` on the same scale as the ``raw`` preconditioner (exactly its
    Kronecker factorisation when each sample has one token).
    """

    name: str
    activation_sum: torch.Tensor
    gradient_sum: torch.Tensor
    num_tokens: int
    num_samples: int

    @property
    def activation_cov(self) -> torch.Tensor:
        """A: mean over tokens of projected activation outer products ``[rank_in, rank_in]``."""
        return self.activation_sum / max(self.num_tokens, 1)

    @property
    def gradient_cov(self) -> torch.Tensor:
        """S: mean over samples of token-summed output-gradient outer products."""
        return self.gradient_sum / max(self.num_samples, 1)

    def merge(self, other: KfacStats) -> KfacStats:
        """Statistics of the union of both data sets (e.g. several batches or parties)."""
        if other.name != self.name or other.activation_sum.shape != self.activation_sum.shape:
            raise DataError(f"cannot merge KFAC statistics of {self.name!r} and {other.name!r}.")
        return KfacStats(
            self.name,
            self.activation_sum + other.activation_sum,
            self.gradient_sum + other.gradient_sum,
            self.num_tokens + other.num_tokens,
            self.num_samples + other.num_samples,
        )


@dataclass
class _LayerPass:
    """Projected activations and output gradients of one layer, one entry per call."""

    activations: list[torch.Tensor]  # [n, T, rank_in] each
    outputs: list[torch.Tensor]  # layer outputs whose gradients give delta
    gradients: list[torch.Tensor]  # [n, T, rank_out] each, filled after backward


def _resolve_layers(model: torch.nn.Module, spec: ProjectionSpec) -> list[torch.nn.Module]:
    """The modules the spec names, checked against the spec's shapes."""
    if not isinstance(spec, ProjectionSpec):
        raise ConfigError(f"expected a ProjectionSpec, got {type(spec).__name__}.")
    modules = dict(model.named_modules())
    resolved = []
    for layer in spec.layers:
        module = modules.get(layer.name)
        if module is None:
            raise ModelError(
                f"the model does not match the projection spec: it has no layer {layer.name!r}. "
                "Use the model the spec was built for, or rebuild it with ProjectionSpec.for_model."
            )
        dims = layer_dims(module)
        if dims is None:
            raise ModelError(
                f"the model does not match the projection spec: layer {layer.name!r} is a "
                f"{type(module).__name__}, not a torch.nn.Linear or transformers Conv1D."
            )
        if dims != (layer.in_features, layer.out_features):
            raise ModelError(
                f"the model does not match the projection spec: layer {layer.name!r} has "
                f"(in, out) = {dims} but the spec says ({layer.in_features}, "
                f"{layer.out_features}). Use the model the spec was built for, or rebuild it "
                "with ProjectionSpec.for_model."
            )
        resolved.append(module)
    return resolved


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own training flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _flatten_tokens(tensor: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """``[n, features]`` or ``[n, ..., features]`` -> ``[n, T, features]``."""
    if tensor.dim() < 2 or tensor.shape[0] != n:
        raise ModelError(
            f"layer {name!r} saw a tensor of shape {tuple(tensor.shape)}, not one with the "
            f"{n} samples first; per-sample gradients need the sample axis kept first."
        )
    return tensor.reshape(n, -1, tensor.shape[-1])


def _one_pass(
    model: torch.nn.Module, spec: ProjectionSpec, task: Task, batch: Batch
) -> tuple[int, dict[str, _LayerPass]]:
    """Forward + one backward of the summed loss; projected activations and output grads."""
    n = batch_size(batch)
    if torch.is_inference_mode_enabled():
        raise ConfigError("projected gradients cannot be computed under torch.inference_mode().")
    modules = _resolve_layers(model, spec)
    dtype = torch.float64 if modules[0].weight.dtype == torch.float64 else torch.float32
    matrices = {
        layer.name: projection_matrices(spec, layer, dtype, module.weight.device)
        for layer, module in zip(spec.layers, modules)
    }
    passes = {layer.name: _LayerPass([], [], []) for layer in spec.layers}

    def make_hook(name: str) -> Any:
        p_in = matrices[name][0]

        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ModelError(f"layer {name!r} was called without a positional input tensor.")
            activation = _flatten_tokens(inputs[0].detach(), n, name).to(dtype)
            passes[name].activations.append(activation @ p_in.T)
            if not output.requires_grad:  # frozen weights: make the output a leaf we can probe
                output = output.detach().requires_grad_(True)
            passes[name].outputs.append(output)
            return output

        return hook

    handles = [
        module.register_forward_hook(make_hook(layer.name))
        for layer, module in zip(spec.layers, modules)
    ]
    try:
        with _eval_mode(model), torch.enable_grad():
            losses = task.per_sample_loss(model, batch)
            if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
                raise DataError(
                    f"task {getattr(task, 'name', task)!r} returned losses of shape {shape}; "
                    f"it must return one loss per sample, shape ({n},)."
                )
            if not torch.isfinite(losses).all():
                raise DataError("some per-sample losses are NaN or infinite; check the inputs.")
            outputs = [out for name in passes for out in passes[name].outputs]
            if not outputs or not losses.requires_grad:
                raise ModelError(
                    "the loss does not depend on any projected layer; check the spec's "
                    "layers against the model's forward pass."
                )
            deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    index = 0
    for name, layer_pass in passes.items():
        p_out = matrices[name][1]
        for output in layer_pass.outputs:
            delta = deltas[index]
            index += 1
            delta = torch.zeros_like(output) if delta is None else delta
            layer_pass.gradients.append(_flatten_tokens(delta, n, name).to(dtype) @ p_out.T)
        layer_pass.outputs.clear()
    return n, passes


def _grads_from_pass(spec: ProjectionSpec, n: int, passes: dict[str, _LayerPass]) -> torch.Tensor:
    reference = next(p.activations[0] for p in passes.values() if p.activations)
    blocks = []
    for layer in spec.layers:
        layer_pass = passes[layer.name]
        block = torch.zeros(n, layer.rank_out, layer.rank_in, dtype=reference.dtype,
                            device=reference.device)  # stays zero for a layer the loss never used
        for act, grad in zip(layer_pass.activations, layer_pass.gradients):
            block = block + torch.einsum("nto,nti->noi", grad, act).to(reference.device)
        blocks.append(block.reshape(n, layer.dim))
    return torch.cat(blocks, dim=1)


def _stats_from_pass(
    spec: ProjectionSpec, n: int, passes: dict[str, _LayerPass], batch: Batch
) -> dict[str, KfacStats]:
    mask = batch.get("attention_mask")
    stats = {}
    for layer in spec.layers:
        layer_pass = passes[layer.name]
        a_sum = torch.zeros(layer.rank_in, layer.rank_in, dtype=torch.float64)
        s_sum = torch.zeros(layer.rank_out, layer.rank_out, dtype=torch.float64)
        tokens = 0
        for act, grad in zip(layer_pass.activations, layer_pass.gradients):
            act, grad = act.double().cpu(), grad.double().cpu()
            if mask is not None and tuple(mask.shape) == tuple(act.shape[:2]):
                real = mask.cpu() != 0
                act = act[real]
                tokens += int(real.sum())
            else:
                act = act.reshape(-1, act.shape[-1])
                tokens += act.shape[0]
            grad = grad.reshape(-1, grad.shape[-1])
            a_sum += act.T @ act
            s_sum += grad.T @ grad
        stats[layer.name] = KfacStats(layer.name, a_sum, s_sum, tokens, n)
    return stats


def projected_grads(
    model: torch.nn.Module, spec: ProjectionSpec, task: Task | str, batch: Batch
) -> torch.Tensor:
    """Projected per-sample loss gradients ``[n, spec.dim]`` for one batch.

    float64 if the model's projected layers are float64, else float32. The model runs in
    eval mode (restored afterwards) and no parameter ``.grad`` is touched.
    """
    n, passes = _one_pass(model, spec, get_task(task), batch)
    return _grads_from_pass(spec, n, passes)


def _run(
    model: torch.nn.Module,
    spec: ProjectionSpec,
    task: Task | str,
    batches: Iterable[Batch],
    want_grads: bool,
    want_stats: bool,
    progress: bool,
) -> tuple[torch.Tensor, dict[str, KfacStats]]:
    """Loop over batches; gradients and/or merged factors (empty when not wanted)."""
    task = get_task(task)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="projected gradients", unit="batch")
    grads: list[torch.Tensor] = []
    stats: dict[str, KfacStats] = {}
    seen = 0
    for batch in batches:
        n, passes = _one_pass(model, spec, task, batch)
        seen += 1
        if want_stats:
            new = _stats_from_pass(spec, n, passes, batch)
            stats = {k: stats[k].merge(v) if k in stats else v for k, v in new.items()}
        if want_grads:
            grads.append(_grads_from_pass(spec, n, passes))
    if not seen:
        raise DataError("no batches were given; pass at least one non-empty batch.")
    return (torch.cat(grads) if grads else torch.empty(0, spec.dim)), stats


def projected_grads_batched(
    model: torch.nn.Module,
    spec: ProjectionSpec,
    task: Task | str,
    dataset_batches: Iterable[Batch],
    progress: bool = False,
) -> torch.Tensor:
    """:func:`projected_grads` over many batches, concatenated in order ``[N, spec.dim]``."""
    return _run(model, spec, task, dataset_batches, True, False, progress)[0]


def kfac_statistics(
    model: torch.nn.Module,
    spec: ProjectionSpec,
    task: Task | str,
    batches: Iterable[Batch],
    progress: bool = False,
) -> dict[str, KfacStats]:
    """Per-layer projected KFAC factors (layer name -> :class:`KfacStats`) over ``batches``."""
    return _run(model, spec, task, batches, False, True, progress)[1]


def projected_grads_with_kfac(
    model: torch.nn.Module,
    spec: ProjectionSpec,
    task: Task | str,
    batches: Iterable[Batch],
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, KfacStats]]:
    """Projected gradients and KFAC factors from one pass (what EKFAC needs)."""
    return _run(model, spec, task, batches, True, True, progress)
