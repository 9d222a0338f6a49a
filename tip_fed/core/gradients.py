"""Projected per-sample gradients from hooks, without ever forming a full per-sample gradient.

For a Linear / Conv1D layer with input activations ``a`` and output gradients
``delta = d(sum_i loss_i)/d(out)``, sample ``i``'s weight gradient is ``sum_t delta_it a_itᵀ``
(``[out, in]``; Conv1D's ``[in, out]`` weight is treated in the same ``[out, in]``
orientation). Its projection is

    G_i = P_out (sum_t delta_it a_itᵀ) P_inᵀ = sum_t (P_out delta_it)(P_in a_it)ᵀ,

so one forward hook (projected activations) and one backward pass of the summed loss down to
the layer outputs (projected output gradients) give all ``G_i``. ``G_i`` is flattened
row-major (``[rank_out, rank_in]``) and layers are concatenated in spec order. For a layer
whose spec entry has ``bias``, ``a`` carries a constant 1 as its last feature, so
``delta_it · 1`` (the bias gradient) is the last column of the same Kronecker product and is
projected with the weights. Samples must not interact in the forward pass (the model runs in eval mode, so
dropout and batch-norm statistics are off); padding then cannot change a sample's gradient,
because padded positions get zero gradient.

The backward pass does no more than the projection needs. During the pass every parameter has
``requires_grad`` off (restored afterwards) and the batch is detached, so autograd neither
saves layer inputs for weight gradients nor records anything below the lowest projected layer;
that layer's output joins the graph by adding a zero scalar "anchor" (an add, not a detached
leaf, so later in-place ops on it stay legal). Backward runs to the anchor, and a tensor hook
on each projected output projects its gradient ``delta`` as soon as autograd has it, so no
full-size ``delta`` outlives its use and no parameter ``.grad`` is ever computed.

A weight tied to another module (a language model's output layer sharing the input embedding)
is projected as the gradient through the projected layer's own calls; the embedding lookup's
share of the shared tensor's gradient is not part of that layer's block.

KFAC statistics come from the same pass (see :class:`KfacStats` for the normalisation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tip_fed.core.projection import ProjectionSpec, has_bias, layer_dims, projection_matrices
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

    activations: list[torch.Tensor] = field(default_factory=list)  # [n, T, rank_in] each
    gradients: list[torch.Tensor] = field(default_factory=list)  # [n, T, rank_out] each
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # call -> projected, in backward


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
        if layer.bias and not has_bias(module):
            raise ModelError(
                f"the model does not match the projection spec: layer {layer.name!r} has no "
                "bias but the spec includes one. Rebuild the spec with ProjectionSpec.for_model."
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


def _flatten_tokens(tensor: torch.Tensor, n: int, name: str, length: int | None = None) -> torch.Tensor:
    """``[n, features]`` or ``[n, ..., features]`` -> ``[n, T, features]``.

    ``[n * length, features]`` (a batch flattened sample-major, ``x.view(-1, features)``, as
    OPT's decoder MLP does) is unflattened to ``[n, length, features]``; ``length`` is the
    batch's sequence length.
    """
    if tensor.dim() == 2 and length is not None and length > 1 and tensor.shape[0] == n * length:
        return tensor.reshape(n, length, tensor.shape[-1])
    if tensor.dim() < 2 or tensor.shape[0] != n:
        raise ModelError(
            f"layer {name!r} saw a tensor of shape {tuple(tensor.shape)}, not one with the "
            f"{n} samples first; per-sample gradients need the sample axis kept first."
        )
    return tensor.reshape(n, -1, tensor.shape[-1])


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """``requires_grad`` off for every parameter for the duration, then back on where it was.

    Why: with trainable weights autograd saves each layer's input for the weight gradient
    and builds graph down to the embeddings; the projection needs neither.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _one_pass(
    model: torch.nn.Module, spec: ProjectionSpec, task: Task, batch: Batch, mask_nonfinite: bool = False
) -> tuple[int, dict[str, _LayerPass], torch.Tensor]:
    """Forward + one backward of the summed loss; projected activations and output grads, and which
    samples' losses are finite (a non-finite one is a DataError, or masked out of the backward)."""
    n = batch_size(batch)
    lengths = {int(value.shape[1]) for value in batch.values() if value.dim() >= 2}
    length = lengths.pop() if len(lengths) == 1 else None  # the batch's sequence length, if it has one
    if torch.is_inference_mode_enabled():
        raise ConfigError("projected gradients cannot be computed under torch.inference_mode().")
    modules = _resolve_layers(model, spec)
    dtype = torch.float64 if modules[0].weight.dtype == torch.float64 else torch.float32
    passes = {layer.name: _LayerPass() for layer in spec.layers}
    # Zero scalar that connects the lowest projected outputs to the graph (see module docstring).
    anchor = torch.zeros((), requires_grad=True)

    def make_hook(
        layer_pass: _LayerPass, name: str, bias: bool, p_in: torch.Tensor, p_out: torch.Tensor
    ) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ModelError(f"layer {name!r} was called without a positional input tensor.")
            activation = _flatten_tokens(inputs[0].detach(), n, name, length).to(dtype)
            if bias:  # constant 1 input: the bias gradient joins the weight gradient
                activation = torch.cat([activation, activation.new_ones(*activation.shape[:2], 1)], 2)
            call = len(layer_pass.activations)
            layer_pass.activations.append(activation @ p_in.T)
            if not output.requires_grad:  # lowest projected layer on this path
                output = output + anchor

            def project_delta(delta: torch.Tensor) -> None:
                layer_pass.deltas[call] = _flatten_tokens(delta, n, name, length).to(dtype) @ p_out.T

            output.register_hook(project_delta)
            return output

        return hook

    handles = []
    for layer, module in zip(spec.layers, modules, strict=True):
        p_in, p_out = projection_matrices(spec, layer, dtype, module.get_parameter("weight").device)
        hook = make_hook(passes[layer.name], layer.name, layer.bias, p_in, p_out)
        handles.append(module.register_forward_hook(hook))
    detached = {key: value.detach() for key, value in batch.items()}
    try:
        with _eval_mode(model), _frozen_parameters(model), torch.enable_grad():
            losses = task.per_sample_loss(model, detached)
            if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
                raise DataError(
                    f"task {getattr(task, 'name', task)!r} returned losses of shape {shape}; "
                    f"it must return one loss per sample, shape ({n},)."
                )
            finite = torch.isfinite(losses.detach())
            if mask_nonfinite:  # the masked samples send a zero (or non-finite) delta back, nothing else
                losses = torch.where(finite, losses, torch.zeros_like(losses))
            elif not finite.all():
                raise DataError("some per-sample losses are NaN or infinite (a label outside the model's classes or "
                                "a token id outside its vocabulary gives one); check the inputs.")
            if not losses.requires_grad:
                raise ModelError(
                    "the loss does not depend on any projected layer; check the spec's "
                    "layers against the model's forward pass."
                )
            # Backward to the anchor runs every tensor hook, which collect the deltas.
            torch.autograd.grad(losses.sum(), anchor, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for layer in spec.layers:
        layer_pass = passes[layer.name]
        for call, act in enumerate(layer_pass.activations):
            delta = layer_pass.deltas.pop(call, None)  # None: the loss does not use this call
            layer_pass.gradients.append(
                act.new_zeros(*act.shape[:2], layer.rank_out) if delta is None else delta
            )
    return n, passes, finite


def _grads_from_pass(spec: ProjectionSpec, n: int, passes: dict[str, _LayerPass]) -> torch.Tensor:
    reference = next(p.activations[0] for p in passes.values() if p.activations)
    blocks = []
    for layer in spec.layers:
        layer_pass = passes[layer.name]
        block = torch.zeros(n, layer.rank_out, layer.rank_in, dtype=reference.dtype,
                            device=reference.device)  # stays zero for a layer the loss never used
        for act, grad in zip(layer_pass.activations, layer_pass.gradients, strict=True):
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
        for act, grad in zip(layer_pass.activations, layer_pass.gradients, strict=True):
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
    model: torch.nn.Module, spec: ProjectionSpec, task: Task | str, batch: Batch, *, zero_nonfinite: bool = False
) -> torch.Tensor:
    """Projected per-sample loss gradients ``[n, spec.dim]`` for one batch.

    float64 if the model's projected layers are float64, else float32. The model runs in
    eval mode (restored afterwards) and no parameter ``.grad`` is touched. A sample whose loss or
    gradient is not finite is a DataError, or with ``zero_nonfinite`` a zero row (samples do not
    interact, so the others' rows are unchanged).
    """
    n, passes, finite = _one_pass(model, spec, get_task(task), batch, mask_nonfinite=zero_nonfinite)
    grads = _grads_from_pass(spec, n, passes)
    if zero_nonfinite:
        keep = finite.to(grads.device) & torch.isfinite(grads).all(dim=1)
        grads = torch.where(keep[:, None], grads, torch.zeros((), dtype=grads.dtype, device=grads.device))
    return grads


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
        from tip_fed.console import counted

        batches = counted(batches, "projected gradients (batches)", enabled=True)
    grads: list[torch.Tensor] = []
    stats: dict[str, KfacStats] = {}
    seen = 0
    for batch in batches:
        n, passes, _ = _one_pass(model, spec, task, batch)
        seen += 1
        if want_stats:
            new = _stats_from_pass(spec, n, passes, batch)
            stats = {k: stats[k].merge(v) if k in stats else v for k, v in new.items()}
        if want_grads:
            grads.append(_grads_from_pass(spec, n, passes))
        # Free this batch's projected tensors before the next pass: kept alive through it, they
        # sit between its large allocations and fragment the heap (measured: +20% peak RSS).
        del passes
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
