"""In-process sessions (real TenSEAL) with models a buyer actually has.

A plain ``nn.Sequential`` on sklearn's digits and a tiny Llama causal LM go through Buyer ->
Offer -> Seller -> Reply -> settle; every decrypted total and per-sample score must equal the
plaintext product of the buyer's query with the seller's clipped projected gradients, computed
here on the buyer's own model, within CKKS tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core import models
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.protocol import Buyer, BuyerSettings, Seller, SellerPolicy
from tip_fed.wire.tip.v1 import valuation_pb2 as pb


def _settings(rank: int) -> BuyerSettings:
    return BuyerSettings(
        projection=ProjectionConfig(rank=rank),
        preconditioner=PreconditionerConfig(kind="kfac"),
        protocol=ProtocolConfig(disclosure="per-sample", query_budget=1),
    )


def _value_and_check(buyer: Buyer, model: nn.Module, task: str, sellers: dict[str, dict], architecture: str) -> None:
    offer = buyer.offer(max_samples=200)
    assert pb.Offer.FromString(offer).model.architecture == architecture
    replies = [Seller(sid, data, seed=1, policy=SellerPolicy(exact_per_sample=True)).respond(offer)
               for sid, data in sellers.items()]
    valuation = buyer.settle(replies)
    assert valuation.rejected == {} and sorted(v.seller_id for v in valuation.sellers) == sorted(sellers)
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound  # CKKS + sanitising noise: 1e-6 of the score bound
    totals = {}
    for v in valuation.sellers:
        grads = projected_grads(model, buyer.spec, get_task(task), sellers[v.seller_id]).double()
        clipped, _ = clip_rows(grads, buyer.grad_norm_bound)
        plain = (clipped @ buyer.query).numpy()
        assert v.n_samples == len(plain)
        assert np.max(np.abs(v.per_sample - plain)) <= tol
        assert abs(v.total - plain.sum()) <= len(plain) * tol
        totals[v.seller_id] = plain.sum()
    assert len({round(t, 6) for t in totals.values()}) == len(totals)  # sellers really differ


def test_plain_sequential_on_digits():
    # Prepare: the README's model, trained briefly on part of digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:600]), y[:600]).backward()
        opt.step()
    model.eval()
    def part(lo, hi):
        return {"x": x[lo:hi], "y": y[lo:hi]}
    sellers = {"a": part(900, 960), "b": part(960, 1060), "c": part(1060, 1090)}
    sellers["c"]["y"] = (sellers["c"]["y"] + 1) % 10  # a seller with wrong labels

    # Execute + Assert
    buyer = Buyer(model, get_task("classification"), objective=part(600, 700), train=part(0, 300),
                  settings=_settings(rank=8))
    _value_and_check(buyer, model, "classification", sellers, "sequential")


def _tokens(n: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_causal_lm(tied):
    torch.manual_seed(3)
    model = models.build("transformers", {"model_class": "LlamaForCausalLM", "config": {
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": tied}})
    sellers = {f"s{i}": _tokens(n, 20 + i) for i, n in enumerate([5, 9, 14])}
    buyer = Buyer(model, get_task("causal-lm"), objective=_tokens(8, 1), train=_tokens(16, 2),
                  settings=_settings(rank=4))
    _value_and_check(buyer, model, "causal-lm", sellers, "transformers")
