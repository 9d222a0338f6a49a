"""Hook-based projected per-sample gradients against explicit per-sample autograd.

The independent computation: run each sample *alone and unpadded*, take
``torch.autograd.grad`` of its loss w.r.t. each projected weight, and project with the
same matrices (``P_out W_grad P_inᵀ``; Conv1D weights transposed first). Float64 models.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tip_fed.core.gradients import (
    kfac_statistics,
    projected_grads,
    projected_grads_batched,
    projected_grads_with_kfac,
)
from tip_fed.core.projection import LayerProjection, ProjectionSpec, projection_matrices
from tip_fed.core.tasks import ClassificationTask, get_task
from tip_fed.errors import ConfigError, DataError, ModelError

VOCAB = 100


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(10, 4)
    ).double()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).double()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(2)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return GPT2LMHeadModel(config).double()


def padded(lengths: list[int], length: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(lengths), length))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, length - n:] = 1
        else:
            mask[row, :n] = 1
    return ids * mask, mask  # pad id 0


def unpadded(batch: dict, row: int) -> dict:
    """Sample ``row`` alone, with its padding cut off."""
    real = batch["attention_mask"][row] != 0
    single = {key: value[row:row + 1] for key, value in batch.items()}
    for key in ("input_ids", "attention_mask"):
        single[key] = single[key][:, real]
    return single


def explicit_projected(model, spec: ProjectionSpec, task, single: dict) -> torch.Tensor:
    """Independent reference: full weight (and bias) gradient of one sample's loss, then projected."""
    model.eval()
    modules = dict(model.named_modules())
    params = []
    for layer in spec.layers:
        params.append(modules[layer.name].weight)
        params.extend([modules[layer.name].bias] if layer.bias else [])
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:  # a frozen parameter's gradient is still part of the score
        p.requires_grad_(True)
    loss = get_task(task).per_sample_loss(model, single)
    assert loss.shape == (1,)
    grads = list(torch.autograd.grad(loss[0], params))
    for p in frozen:
        p.requires_grad_(False)
    blocks = []
    for layer in spec.layers:
        grad = grads.pop(0)
        w_grad = grad if isinstance(modules[layer.name], torch.nn.Linear) else grad.T
        if layer.bias:  # bias gradient as the last input column
            w_grad = torch.cat([w_grad, grads.pop(0)[:, None]], dim=1)
        p_in, p_out = projection_matrices(spec, layer, torch.float64)
        blocks.append((p_out @ w_grad @ p_in.T).reshape(-1))
    return torch.cat(blocks)


def each_alone(model, spec: ProjectionSpec, batch: dict) -> torch.Tensor:
    """The explicit projected gradient of every sample of a classification batch, one sample at a time."""
    n = len(batch["y"])
    return torch.stack([explicit_projected(model, spec, "classification", {k: v[i:i + 1] for k, v in batch.items()})
                        for i in range(n)])


def test_mlp_matches_explicit_per_sample_gradients() -> None:
    model = mlp()
    model.train()  # projected_grads must switch dropout off and restore this afterwards
    spec = ProjectionSpec.for_model(model, rank=(3, 2), seed=5)
    torch.manual_seed(4)
    batch = {"x": torch.randn(7, 6, dtype=torch.float64), "y": torch.randint(0, 4, (7,))}

    grads = projected_grads(model, spec, "classification", batch)

    assert grads.shape == (7, spec.dim) and grads.dtype == torch.float64
    assert model.training and all(p.grad is None for p in model.parameters())
    expected = each_alone(model, spec, batch)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_frozen_weights_and_float32_models() -> None:
    model = mlp()
    spec = ProjectionSpec.for_model(model, rank=3, seed=1)
    batch = {"x": torch.randn(5, 6, dtype=torch.float64), "y": torch.randint(0, 4, (5,))}
    reference = projected_grads(model, spec, ClassificationTask(), batch)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.testing.assert_close(projected_grads(model, spec, "classification", batch), reference)
    model.float()
    single = projected_grads(model, spec, "classification", {"x": batch["x"].float(), "y": batch["y"]})
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, reference.float(), rtol=1e-4, atol=1e-5)


def reused() -> torch.nn.Sequential:
    """One Linear applied twice (the same module at positions 0 and 2): its gradient is the sum over both uses."""
    inner = torch.nn.Linear(5, 5)
    return torch.nn.Sequential(inner, torch.nn.Tanh(), inner, torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_layer_used_twice_sums_both_uses() -> None:
    torch.manual_seed(0)
    model = reused().double()
    assert [layer.name for layer in ProjectionSpec.for_model(model, rank=3).layers] == ["0", "4"]
    spec = ProjectionSpec.for_model(model, rank=3, seed=2)
    batch = {"x": torch.randn(4, 5, dtype=torch.float64), "y": torch.randint(0, 3, (4,))}
    grads = projected_grads(model, spec, "classification", batch)
    expected = each_alone(model, spec, batch)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_bert_padded_batch_matches_each_sample_alone() -> None:
    model = tiny_bert()
    model.train()
    spec = ProjectionSpec.for_model(model, rank=3, seed=11)
    assert all(layer.bias for layer in spec.layers)  # every BERT Linear has a bias: all in the score
    ids, mask = padded([9, 5, 3, 7], 9)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}

    grads = projected_grads(model, spec, "sequence-classification", batch)

    assert model.training
    assert (grads.abs().amax(dim=1) > 1e-4).all()  # non-trivial for every sample
    for row in range(4):
        single = unpadded(batch, row)
        expected = explicit_projected(model, spec, "sequence-classification", single)
        torch.testing.assert_close(grads[row], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("left", [False, True])
def test_gpt2_padded_batch_matches_each_sample_alone(left: bool) -> None:
    model = tiny_gpt2()
    spec = ProjectionSpec.for_model(model, rank=(2, 3), seed=12)
    assert any(layer.name == "lm_head" for layer in spec.layers)
    assert all(layer.bias == (layer.name != "lm_head") for layer in spec.layers)  # Conv1D biases; lm_head has none
    ids, mask = padded([8, 4, 6], 8, left=left)
    batch = {"input_ids": ids, "attention_mask": mask}

    grads = projected_grads(model, spec, "causal-lm", batch)

    assert (grads.abs().amax(dim=1) > 1e-4).all()
    for row in range(3):
        expected = explicit_projected(model, spec, "causal-lm", unpadded(batch, row))
        torch.testing.assert_close(grads[row], expected, rtol=1e-9, atol=1e-11)


def test_llama_linear_layers_without_bias() -> None:
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).double()
    spec = ProjectionSpec.for_model(model, rank=3, seed=13, include=["model.*"])
    assert spec.layers and not any(layer.bias for layer in spec.layers)
    ids, mask = padded([7, 4], 7)
    batch = {"input_ids": ids, "attention_mask": mask}

    grads = projected_grads(model, spec, "causal-lm", batch)

    for row in range(2):
        expected = explicit_projected(model, spec, "causal-lm", unpadded(batch, row))
        torch.testing.assert_close(grads[row], expected, rtol=1e-9, atol=1e-11)


def test_batched_helper_concatenates_in_order() -> None:
    model = mlp()
    spec = ProjectionSpec.for_model(model, rank=2)
    batch = {"x": torch.randn(6, 6, dtype=torch.float64), "y": torch.randint(0, 4, (6,))}
    parts = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole = projected_grads(model, spec, "classification", batch)
    torch.testing.assert_close(projected_grads_batched(model, spec, "classification", parts), whole)
    torch.testing.assert_close(
        projected_grads_batched(model, spec, "classification", iter(parts), progress=True), whole)


def test_kfac_statistics_of_an_mlp() -> None:
    """Per-sample (T = 1): A = mean (P_in a)(P_in a)ᵀ; S = mean (P_out δ)(P_out δ)ᵀ.

    δ_i is recovered from the explicit projected gradient G_i = (P_out δ_i)(P_in a_i)ᵀ as
    G_i (P_in a_i) / |P_in a_i|².
    """
    model = mlp()
    spec = ProjectionSpec.for_model(model, rank=3, seed=9)
    x = torch.randn(8, 6, dtype=torch.float64)
    batch = {"x": x, "y": torch.randint(0, 4, (8,))}
    grads, stats = projected_grads_with_kfac(model, spec, "classification", [batch])
    torch.testing.assert_close(grads, projected_grads(model, spec, "classification", batch))

    model.eval()
    inputs = {"0": x, "3": model[2](model[1](model[0](x)))}
    explicit = each_alone(model, spec, batch)
    for layer, start in zip(spec.layers, spec.offsets(), strict=True):
        p_in, _ = projection_matrices(spec, layer, torch.float64)
        a = inputs[layer.name].detach()
        a = torch.cat([a, torch.ones(8, 1, dtype=a.dtype)], 1) if layer.bias else a
        pa = a @ p_in.T
        g = explicit[:, start:start + layer.dim].reshape(8, layer.rank_out, layer.rank_in)
        pd = torch.einsum("noi,ni->no", g, pa) / (pa * pa).sum(1, keepdim=True)
        entry = stats[layer.name]
        assert (entry.num_tokens, entry.num_samples) == (8, 8)
        torch.testing.assert_close(entry.activation_cov, pa.T @ pa / 8)
        torch.testing.assert_close(entry.gradient_cov, pd.T @ pd / 8)
    only_stats = kfac_statistics(model, spec, "classification", [batch])
    torch.testing.assert_close(only_stats["3"].gradient_sum, stats["3"].gradient_sum)


def test_kfac_statistics_ignore_padding() -> None:
    model = tiny_bert()
    spec = ProjectionSpec.for_model(model, rank=2, include=["*.intermediate.dense", "classifier"])
    ids, mask = padded([6, 3, 5], 6)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
    together = kfac_statistics(model, spec, "sequence-classification", [batch])
    alone = kfac_statistics(model, spec, "sequence-classification",
                            [unpadded(batch, row) for row in range(3)])
    for name, entry in together.items():
        expected_tokens = 14 if "intermediate" in name else 3  # classifier sees one vector per sample
        assert (entry.num_tokens, entry.num_samples) == (expected_tokens, 3)
        assert (alone[name].num_tokens, alone[name].num_samples) == (expected_tokens, 3)
        torch.testing.assert_close(entry.activation_sum, alone[name].activation_sum)
        torch.testing.assert_close(entry.gradient_sum, alone[name].gradient_sum)


def test_spec_model_mismatch_and_bad_inputs() -> None:
    model = mlp()
    batch = {"x": torch.randn(3, 6, dtype=torch.float64), "y": torch.randint(0, 4, (3,))}
    other = ProjectionSpec(layers=(LayerProjection("0", 7, 10, 2, 2),), seed=0)
    unbiased = torch.nn.Sequential(torch.nn.Linear(6, 10, bias=False)).double()
    with pytest.raises(ModelError, match="has no bias"):
        projected_grads(unbiased, ProjectionSpec(layers=(LayerProjection("0", 6, 10, 2, 2, True),), seed=0),
                        "classification", batch)
    with pytest.raises(ModelError, match="does not match the projection spec: layer '0' has"):
        projected_grads(model, other, "classification", batch)
    missing = ProjectionSpec(layers=(LayerProjection("encoder.9", 6, 10, 2, 2),), seed=0)
    with pytest.raises(ModelError, match="has no layer"):
        projected_grads(model, missing, "classification", batch)
    not_linear = ProjectionSpec(layers=(LayerProjection("1", 6, 10, 2, 2),), seed=0)
    with pytest.raises(ModelError, match="Tanh"):
        projected_grads(model, not_linear, "classification", batch)
    spec = ProjectionSpec.for_model(model, rank=2)
    with pytest.raises(DataError):
        projected_grads(model, spec, "classification", {"x": batch["x"][:0], "y": batch["y"][:0]})
    with pytest.raises(DataError):
        projected_grads(model, spec, "classification", {})
    with pytest.raises(DataError):
        projected_grads_batched(model, spec, "classification", [])
    with pytest.raises(ConfigError):
        projected_grads(model, spec, "regression-of-doom", batch)


class MeanLossTask:
    name = "mean"

    def per_sample_loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


class InPlace(torch.nn.Module):
    """In-place ops on projected outputs, including the lowest one (which joins the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(6, 8)
        self.second = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        hidden.tanh_()
        out = self.second(hidden)
        out += 1.0
        return out


def test_extraction_leaves_parameters_untouched_and_allows_inplace_ops() -> None:
    torch.manual_seed(6)
    model = InPlace().double()
    model.first.bias.requires_grad_(False)  # a user's frozen parameter stays frozen
    spec = ProjectionSpec.for_model(model, rank=3, seed=4)
    batch = {"x": torch.randn(5, 6, dtype=torch.float64), "y": torch.randint(0, 4, (5,))}

    grads = projected_grads(model, spec, "classification", batch)

    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    expected = each_alone(model, spec, batch)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_a_bad_task_is_refused_and_parameters_are_restored() -> None:
    model = mlp()
    spec = ProjectionSpec.for_model(model, rank=2)
    batch = {"x": torch.randn(3, 6, dtype=torch.float64), "y": torch.randint(0, 4, (3,))}
    with pytest.raises(DataError, match="one loss per sample"):
        projected_grads(model, spec, MeanLossTask(), batch)
    assert all(p.requires_grad for p in model.parameters())

    class IgnoresModel:
        name = "ignores-model"

        def per_sample_loss(self, model, batch):
            model(batch["x"])
            return batch["x"].sum(dim=1)

    with pytest.raises(ModelError, match="does not depend on any projected layer"):
        projected_grads(model, spec, IgnoresModel(), batch)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
