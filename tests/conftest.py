"""Fixtures and helpers shared across test tiers: data, a trained MLP, a buyer factory, plaintext
reference scores, TLS material, free loopback ports and a bounded wait."""

import json
import time

import pytest
import torch

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.crypto import SessionKeys, encrypt_query, load_public_context
from tip_fed.protocol import Buyer, BuyerSettings
from tip_fed.runtimes.deployment import free_port  # noqa: F401 (shared with the tests)
from tip_fed.tls import create_ca, issue_cert

TASK = get_task("classification")


def make_data(n, seed, shift=0.0, features=10):
    """n labelled records; ``shift`` moves the distribution so sellers differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) + shift
    y = (x[:, 0] + 0.5 * x[:, 1] > shift).long()
    return {"x": x, "y": y}


def open_session(plan, x):
    """The buyer's side of one encrypted session: fresh keys for ``plan``, the public context a seller
    loads from their bytes, and the query ``x`` encrypted; (keys, context, query)."""
    keys = SessionKeys.generate(plan)
    return keys, load_public_context(keys.public_context_bytes(), plan.params), encrypt_query(keys, plan, x)


def plaintext_scores(buyer, model, data, task=TASK):
    """The scores a seller's encrypted reply must decrypt to: clipped projected gradients times the query."""
    g = projected_grads(model, buyer.spec, task, data).double()
    return (clip_rows(g, buyer.grad_norm_bound)[0] @ buyer.query).numpy()


def flower_pyproject(name, publisher, server, client, config="", include=None):
    """The pyproject.toml of a Flower App ``name`` (as ``flwr run <dir>`` builds it): ``server``/``client`` name the
    apps (``module:object``), ``config`` adds lines to its run config (app-signature is always there), ``include``
    sets fab-include."""
    files = f"fab-include = {json.dumps(include)}\n" if include else ""
    return f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"

[tool.flwr.app]
publisher = "{publisher}"
{files}
[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"

[tool.flwr.app.config]
{config}app-signature = ""
"""


def wait_until(condition, timeout_s, poll_s=0.05):
    """Poll ``condition`` until it is true or ``timeout_s`` has passed (a guard against a hang, never a
    claim about speed); its last value, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return value


def seller_serve_error(capsys, *args):
    """``tip-fed seller serve --port 0 ARGS`` refused before it starts: exit code 2 and one line on
    stderr (a user error, not a traceback); that line."""
    from tip_fed.cli import main

    assert main(["seller", "serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tip-fed: error: ") and err.count("\n") == 1, err
    return err


def train_classifier(model, x, y, steps):
    """``model`` trained by full-batch Adam (lr 0.01) on the cross-entropy of (x, y) for ``steps`` steps; in eval mode.
    Deterministic: it draws no random numbers."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def model():
    """A 10-16-2 MLP trained briefly on make_data, shared read-only by every test that needs one."""
    torch.manual_seed(0)
    data = make_data(200, 1)
    return train_classifier(MLP([10, 16, 2]), data["x"], data["y"], 50)


@pytest.fixture(scope="session")
def seller_data():
    """Three sellers of 5, 33 and 70 records with shifted distributions."""
    return {f"s{i}": make_data(n, 10 + i, shift=0.3 * i) for i, n in enumerate([5, 33, 70])}


@pytest.fixture(scope="session")
def make_buyer(model):
    """Buyers over the shared model (or ``over=`` another): rank-4 projection, identity preconditioner."""

    def factory(disclosure="per-sample", budget=1, over=None, **protocol):
        settings = BuyerSettings(
            projection=ProjectionConfig(rank=4),
            preconditioner=PreconditionerConfig(kind="identity"),
            protocol=ProtocolConfig(disclosure=disclosure, query_budget=budget, **protocol),
        )
        return Buyer(model if over is None else over, TASK, objective=make_data(40, 2, shift=0.5),
                     train=make_data(120, 3), settings=settings)

    return factory


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate; ``dir`` for more of them."""
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca(d)
    return {"dir": d, "ca": ca, "server": issue_cert(ca, d, "seller"),
            "client": issue_cert(ca, d, "buyer", client=True)}
