"""The fidelity planner against an independent reference: dense per-sample autograd gradients.

The reference never touches tip_fed's hooks or projections: each sample is run alone, its loss
differentiated with ``torch.autograd.grad`` w.r.t. every weight and bias of the planned layers,
and its exact score is the dot product with the mean objective gradient (computed the same
way). The planned spec's projected scores (tip_fed's own gradient code) must agree with it to
the target on *held-out* samples the planner never saw, for an MLP and a tiny GPT-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tip_fed.config import ProjectionConfig, load_config
from tip_fed.core.fidelity import SMALL_LAYER, plan_ranks, projection_bytes, score_agreement
from tip_fed.core.gradients import projected_grads
from tip_fed.core.projection import ProjectionSpec
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError
from tip_fed.protocol import BuyerSettings, PreparedQuery
from tip_fed.protocol.prepared import fit_query

from ...conftest import train_classifier

VOCAB = 64


def mlp_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 24, generator=g)
    return {"x": x, "y": (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()}


def wide_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 2)).double()
    data = mlp_data(256, 1)
    return train_classifier(model, data["x"].double(), data["y"], 30)


def as_double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(2)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double().eval()


def tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a repetitive language (each token mostly follows its predecessor + 1) so gradients share structure
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    steps = (torch.rand(n, 12, generator=g) < 0.8).long() + torch.randint(0, 3, (n, 12), generator=g) * 0
    ids = (start + torch.cumsum(steps, 1)) % VOCAB
    ids = torch.cat([start, ids], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dense_scores(model: torch.nn.Module, task_name: str, spec: ProjectionSpec, samples: dict[str, torch.Tensor],
                 objective: dict[str, torch.Tensor]) -> np.ndarray:
    """Exact ``ḡ · g_i`` over the spec's layers' weights and biases, one sample at a time (plain autograd)."""
    task = get_task(task_name)
    modules = dict(model.named_modules())
    params = []
    for layer in spec.layers:
        params.append(modules[layer.name].weight)
        if layer.bias:
            params.append(modules[layer.name].bias)

    def grad(batch: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = task.per_sample_loss(model, one).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    n_obj = next(iter(objective.values())).shape[0]
    mean = sum(grad(objective, i) for i in range(n_obj)) / n_obj
    n = next(iter(samples.values())).shape[0]
    return np.array([float(grad(samples, i) @ mean) for i in range(n)])


def projected_scores(model: torch.nn.Module, task_name: str, spec: ProjectionSpec,
                     samples: dict[str, torch.Tensor], objective: dict[str, torch.Tensor]) -> np.ndarray:
    mean = projected_grads(model, spec, task_name, objective).double().mean(0)
    return (projected_grads(model, spec, task_name, samples).double() @ mean).numpy()


def test_exact_spec_when_the_budget_allows() -> None:
    model = wide_mlp()
    plan = plan_ranks(model, "classification", as_double(mlp_data(64, 2)), as_double(mlp_data(32, 3)), seed=5,
                      max_dim=10**6)
    exact = ProjectionSpec.for_model(model, rank=10**4, seed=5)
    assert plan.exact and plan.spec == exact and plan.spearman == 1.0
    assert plan.to_dict()["layers"][0] == {"name": "0", "rank_in": 25, "rank_out": 96, "in_dim": 25,
                                           "out_features": 96, "exact": True}
    held_out, objective = as_double(mlp_data(40, 9)), as_double(mlp_data(32, 3))
    np.testing.assert_allclose(projected_scores(model, "classification", plan.spec, held_out, objective),
                               dense_scores(model, "classification", plan.spec, held_out, objective), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_planner_reaches_the_target_on_held_out_data(kind: str) -> None:
    if kind == "mlp":
        model, task, train, objective, held_out = (wide_mlp(), "classification", as_double(mlp_data(200, 2)),
                                                   as_double(mlp_data(48, 3)), as_double(mlp_data(120, 4)))
        include = None
    else:
        model, task, train, objective, held_out = gpt2(), "causal-lm", tokens(240, 2), tokens(24, 3), tokens(120, 4)
        include = ["transformer.h.*"]
    full = ProjectionSpec.for_model(model, rank=10**4, seed=11, include=include)
    max_dim = full.dim // 2  # the exact spec does not fit: the planner must project
    plan = plan_ranks(model, task, train, objective, seed=11, include=include, target=0.95, max_dim=max_dim)
    assert not plan.exact and plan.spec.dim <= max_dim and plan.spearman >= 0.95
    assert any(layer.rank_in < layer.in_dim or layer.rank_out < layer.out_features for layer in plan.spec.layers)
    reference = dense_scores(model, task, plan.spec, held_out, objective)
    got = projected_scores(model, task, plan.spec, held_out, objective)
    rho = score_agreement(got, reference)
    print(f"{kind}: ranks {[(x.rank_in, x.rank_out) for x in plan.spec.layers]}, dim {plan.spec.dim} of "
          f"{full.dim}, planner's held-out Spearman {plan.spearman:.3f}, fresh data vs dense autograd {rho:.3f}")
    assert rho >= 0.95
    # ... and the ranks matter: every layer at rank 1 agrees far less on the same held-out samples
    low = full.at_rank(1)
    assert score_agreement(projected_scores(model, task, low, held_out, objective), reference) < 0.9


def test_budget_and_seller_projection_memory_are_respected() -> None:
    model = wide_mlp()
    train, objective = as_double(mlp_data(120, 2)), as_double(mlp_data(32, 3))
    plan = plan_ranks(model, "classification", train, objective, seed=1, target=1.0, max_dim=300)
    assert plan.spec.dim <= 300 and not plan.exact and plan.spearman_fit < 1.0
    assert plan.to_dict()["reached"] is (plan.spearman >= 1.0)
    # a seller's projection-memory limit binds too (the exact spec would need more)
    full = ProjectionSpec.for_model(model, rank=10**4, seed=1)
    limit = projection_bytes(full) // 3
    capped = plan_ranks(model, "classification", train, objective, seed=1, target=1.0, max_dim=10**6,
                        max_projection_bytes=limit)
    assert projection_bytes(capped.spec) <= limit and not capped.exact
    # small layers are exact from the start: the 65 x 2 output layer is under SMALL_LAYER entries
    assert 65 * 2 <= SMALL_LAYER
    out = capped.spec.layer("4")
    assert (out.rank_in, out.rank_out) == (65, 2)
    with pytest.raises(ConfigError, match="max-dim"):
        plan_ranks(model, "classification", train, objective, seed=1, max_dim=2)


def test_config_rank_auto_is_the_default_and_validated() -> None:
    assert ProjectionConfig().rank == "auto"
    assert load_config(None, ["projection.rank=16"]).projection.rank == 16
    for bad, message in [("projection.rank='x'", "must be an integer >= 1 or 'auto'"),
                         ("projection.fidelity-target=0", "fidelity-target must be in"),
                         ("projection.fidelity-target=1.5", "fidelity-target must be in"),
                         ("projection.max-dim=0", "max-dim must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_prepared_query_records_the_plan(tmp_path) -> None:
    model = wide_mlp().float()
    train, objective = mlp_data(80, 2), mlp_data(32, 3)
    prepared = fit_query(model, get_task("classification"), objective, train,
                         BuyerSettings(projection=ProjectionConfig(max_dim=2000), seed=4))
    fid = prepared.fidelity
    assert fid is not None and fid["ranks"] == "auto" and fid["dim"] == prepared.spec.dim <= 2000
    assert [(x["rank_in"], x["rank_out"]) for x in fid["layers"]] == [
        (layer.rank_in, layer.rank_out) for layer in prepared.spec.layers]
    assert PreparedQuery.load(prepared.save(tmp_path / "q")).fidelity == fid
    fixed = fit_query(model, get_task("classification"), objective, train,
                      BuyerSettings(projection=ProjectionConfig(rank=4)))
    assert fixed.fidelity is None and {layer.rank_in for layer in fixed.spec.layers} == {4}


def test_with_ranks_clips_to_each_layer_and_full_size_is_the_identity() -> None:
    model = wide_mlp()
    spec = ProjectionSpec.for_model(model, rank=4, seed=3)
    wider = spec.with_ranks({"0": (10**3, 7)})
    first = wider.layer("0")
    assert (first.rank_in, first.rank_out) == (25, 7) and wider.layer("2") == spec.layer("2")
    assert spec.at_rank(10**3) == ProjectionSpec.for_model(model, rank=10**3, seed=3)
    with pytest.raises(ConfigError, match="no layer"):
        spec.with_ranks({"nope": (2, 2)})


def test_the_report_sentence_states_the_measured_fidelity() -> None:
    from tip_fed.market.glossary import describe_fidelity as describe

    model = wide_mlp()
    train, objective = as_double(mlp_data(120, 2)), as_double(mlp_data(32, 3))
    plan = plan_ranks(model, "classification", train, objective, seed=1, max_dim=3000)
    text = describe([plan.to_dict(), None])
    assert f"Spearman {plan.spearman:.3f} (target 0.95)" in text and f"dimension {plan.spec.dim}" in text
    exact = plan_ranks(model, "classification", train, objective, seed=1, max_dim=10**6)
    assert "exact" in describe([exact.to_dict()]) and "set by hand" in describe([None])
