"""The buyer's workflow as a new user runs it, with no simulation code: a digits classifier trained
here, sellers' records as safetensors files, three ``tip-fed seller serve`` processes on 127.0.0.1,
``tip-fed buyer prepare`` then ``tip-fed value``.

Every decrypted seller total is checked against a plaintext reference computed here from both
parties' data (the saved query · the seller's projected, clipped gradient sum); a listed seller
that is not running is reported missing without failing the run; runtime = "inprocess" gives the
same valuations; a non-empty --out is refused. Every process a test starts is stopped by PID.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.protocol import PreparedQuery
from tip_fed.protocol.data import load_dataset, save_dataset

from ..conftest import free_port, train_classifier
from . import serving

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "tip_fed.cli"]
SELLERS = {"ones": (1,), "twos-threes": (2, 3), "fours": (4,)}

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def _digits(classes, n, offset):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.cat([torch.nonzero(y == c).flatten()[offset:offset + n] for c in classes])
    return {"x": x[idx], "y": y[idx]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A buyer directory (model weights, objective, train, buyer.toml) and the sellers' data files."""
    root = tmp_path_factory.mktemp("value")
    torch.manual_seed(0)
    model = MLP([64, 16, 10])
    train = _digits((1, 2, 3), 40, 0)
    train_classifier(model, train["x"], train["y"], 60)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    save_dataset(train, root / "train.safetensors")
    save_dataset(_digits((1, 2, 3, 4), 10, 60), root / "objective.safetensors")
    for i, (sid, classes) in enumerate(SELLERS.items()):
        save_dataset(_digits(classes, 12 + 3 * i, 80), root / "sellers" / f"{sid}.safetensors")
    (root / "buyer.toml").write_text(
        'seed = 7\n[model]\ntask = "classification"\nmlp = [64, 16, 10]\nweights = "model.safetensors"\n'
        '[data]\nobjective = "objective.safetensors"\ntrain = "train.safetensors"\n'
        '[projection]\nrank = 8\n[preconditioner]\nkind = "kfac"\n[payouts]\nbudget = 100.0\n'
    )
    return root


@pytest.fixture(scope="module")
def seller_services(workspace):
    """Three ``tip-fed seller serve --insecure --port 0`` processes; their ports, stopped by PID after."""
    procs, ports = {}, {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        for sid in SELLERS:
            procs[sid] = serving.start(["--data", str(workspace / "sellers" / f"{sid}.safetensors"), "--port", "0",
                                        "--insecure", "--max-exact", "-1", "--total-max-exact", "-1"], env=env)
        for sid, proc in procs.items():
            ports[sid] = int(serving.wait_ready(proc, [], 120)["port"])
        yield ports
    finally:
        for proc in procs.values():
            serving.stop(proc)


def _sellers_toml(path, body):
    path.write_text(body)
    return path


def _valuations(out):
    with (out / "valuations.csv").open() as fh:
        return {r["seller_id"]: r for r in csv.DictReader(fh)}


def _plaintext(workspace, prepared):
    """Seller totals computed here from both sides' data: query · sum of projected, clipped gradients."""
    model = MLP([64, 16, 10])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(workspace / "model.safetensors")))
    model.eval()
    task = get_task("classification")
    out = {}
    for sid in SELLERS:
        data = load_dataset(workspace / "sellers" / f"{sid}.safetensors")
        g = projected_grads(model, prepared.spec, task, data).double()
        out[sid] = (clip_rows(g, prepared.grad_norm_bound)[0] @ prepared.query).numpy()
    return out


def _check(valuations, plain, prepared):
    tol = 1e-6 * prepared.query_norm * prepared.grad_norm_bound  # CKKS + sanitising noise per sample
    for sid, scores in plain.items():
        assert int(valuations[sid]["n_samples"]) == len(scores)
        assert abs(float(valuations[sid]["score"]) - scores.sum()) <= len(scores) * tol, sid
    # the sellers differ by far more than the tolerance, so the check above can fail
    totals = sorted(s.sum() for s in plain.values())
    assert min(np.diff(totals)) > 100 * len(plain) * tol


def test_prepare_then_value_over_grpc_matches_plaintext(workspace, seller_services):
    # Prepare
    ghost = free_port()  # listed but nobody listens there
    lines = [f'[[sellers]]\nid = "{sid}"\nendpoint = "127.0.0.1:{port}"\n' for sid, port in seller_services.items()]
    lines.append(f'[[sellers]]\nid = "ghost"\nendpoint = "127.0.0.1:{ghost}"\n')
    _sellers_toml(workspace / "sellers.toml", 'runtime = "grpc"\n[tls]\ninsecure = true\n'
                  '[grpc]\ntimeout-s = 60\nretries = 0\n' + "".join(lines))

    # Execute
    prep = _cli("buyer", "prepare", "buyer.toml", "--out", "query", cwd=workspace)
    run = _cli("value", "buyer.toml", "--sellers", "sellers.toml", "--out", "results", "--prepared", "query",
               cwd=workspace)

    # Assert
    assert prep.returncode == 0, prep.stderr
    assert oct((workspace / "query").stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in (workspace / "query").iterdir()} == {"0o600"}
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) <= 15
    assert "missing     ghost" in run.stdout
    # progress on stderr, a log here: each step, and every seller's answer (or failure) counted as it came
    for said in ("the buyer's query", "4 sellers scoring under encryption (grpc)", "sellers answered 4/4",
                 "writing results"):
        assert said in run.stderr, run.stderr
    assert "fitting the query" in prep.stderr, prep.stderr
    out = workspace / "results"
    assert {"valuations.csv", "payouts.csv", "report.md", "manifest.json", "metrics.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "ground_truth.csv").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["missing"] == ["ghost"] and metrics["run"]["sellers"] == 3
    [session] = json.loads((out / "manifest.json").read_text())["sessions"]
    assert "ghost" in session["valuation"]["seller_failures"]
    prepared = PreparedQuery.load(workspace / "query")
    assert session["valuation"]["model_fingerprint"] == prepared.model_fingerprint
    _check(_valuations(out), _plaintext(workspace, prepared), prepared)
    payouts = [r for r in csv.DictReader((out / "payouts.csv").open()) if r["rule"] == "proportional"]
    assert abs(sum(float(r["payout"]) for r in payouts) - 100.0) < 1e-6

    first = session["offers"]
    assert {sid for sid, o in first.items() if o["weights_shipped"]} == set(SELLERS)
    assert "weights sent to 3 of 4 sellers" in run.stdout

    # the same sellers valued again, without a saved query (fitted in memory): the same numbers, and
    # the Offers go by reference: the sellers kept the verified model, no seller is sent its weights
    again = _cli("value", "buyer.toml", "--sellers", "sellers.toml", "--out", "results2", cwd=workspace)
    assert again.returncode == 0, again.stderr
    _check(_valuations(workspace / "results2"), _plaintext(workspace, prepared), prepared)
    second = json.loads((workspace / "results2" / "manifest.json").read_text())["sessions"][0]["offers"]
    assert set(second) == {*SELLERS, "ghost"} and not any(o["weights_shipped"] for o in second.values())
    assert all(second[sid]["offer_bytes"] < first[sid]["offer_bytes"] for sid in SELLERS)
    assert "weights sent to 0 of 4 sellers" in again.stdout

    # a non-empty --out is refused (nothing is overwritten), accepted with --force
    before = (out / "valuations.csv").read_bytes()
    refused = _cli("value", "buyer.toml", "--sellers", "sellers.toml", "--out", "results", cwd=workspace)
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--force" in refused.stderr
    assert (out / "valuations.csv").read_bytes() == before


def test_inprocess_runtime_gives_the_same_valuations(workspace):
    sellers = "".join(f'[[sellers]]\nid = "{sid}"\ndata = "sellers/{sid}.safetensors"\n' for sid in SELLERS)
    _sellers_toml(workspace / "inprocess.toml", 'runtime = "inprocess"\n' + sellers)
    prep = _cli("buyer", "prepare", "buyer.toml", "--out", "query-inproc", cwd=workspace)
    assert prep.returncode == 0, prep.stderr
    run = _cli("value", "buyer.toml", "--sellers", "inprocess.toml", "--out", "inproc", "--prepared", "query-inproc",
               "--quiet", cwd=workspace)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # --quiet: no progress, and no other library's warning either
    prepared = PreparedQuery.load(workspace / "query-inproc")
    _check(_valuations(workspace / "inproc"), _plaintext(workspace, prepared), prepared)
    assert "Reference rule (ground truth)" not in (workspace / "inproc" / "report.md").read_text()


def test_prepared_query_for_other_settings_is_refused(workspace):
    prep = _cli("buyer", "prepare", "buyer.toml", "--out", "query-old", cwd=workspace)
    assert prep.returncode == 0, prep.stderr
    toml = (workspace / "buyer.toml").read_text().replace("rank = 8", "rank = 4")
    (workspace / "buyer-rank4.toml").write_text(toml)
    _sellers_toml(workspace / "one.toml", 'runtime = "inprocess"\n[[sellers]]\nid = "ones"\n'
                  'data = "sellers/ones.safetensors"\n')
    run = _cli("value", "buyer-rank4.toml", "--sellers", "one.toml", "--out", "stale", "--prepared", "query-old",
               cwd=workspace)
    assert run.returncode == 2 and "other settings" in run.stderr and "buyer prepare" in run.stderr


def test_changed_objective_is_requeried_with_the_saved_preconditioner(workspace):
    """Fit once, query many times: only data.objective changed, so 'value --prepared' recomputes the query
    from the saved preconditioner; the valuations are those of a full fit for the new objective."""
    from tip_fed.config import ProjectionConfig
    from tip_fed.protocol import Buyer, BuyerSettings

    prep = _cli("buyer", "prepare", "buyer.toml", "--out", "query-requery", cwd=workspace)
    assert prep.returncode == 0, prep.stderr
    new_objective = _digits((4,), 12, 100)
    save_dataset(new_objective, workspace / "objective-4.safetensors")
    (workspace / "buyer-obj4.toml").write_text(
        (workspace / "buyer.toml").read_text().replace('"objective.safetensors"', '"objective-4.safetensors"'))
    _sellers_toml(workspace / "inproc-requery.toml", 'runtime = "inprocess"\n' + "".join(
        f'[[sellers]]\nid = "{sid}"\ndata = "sellers/{sid}.safetensors"\n' for sid in SELLERS))

    run = _cli("value", "buyer-obj4.toml", "--sellers", "inproc-requery.toml", "--out", "requery",
               "--prepared", "query-requery", cwd=workspace)

    assert run.returncode == 0, run.stderr
    assert "recomputed for the changed data.objective" in run.stdout
    from safetensors.torch import load_file

    model = MLP([64, 16, 10])
    model.load_state_dict(load_file(str(workspace / "model.safetensors")))
    fresh = Buyer.prepare(model.eval(), get_task("classification"), new_objective,
                          load_dataset(workspace / "train.safetensors"),
                          BuyerSettings(projection=ProjectionConfig(rank=8), seed=7))
    _check(_valuations(workspace / "requery"), _plaintext(workspace, fresh), fresh)

    # a changed training set changes the preconditioner: that needs a new prepare
    save_dataset(_digits((1, 2), 30, 0), workspace / "train-2.safetensors")
    (workspace / "buyer-train2.toml").write_text(
        (workspace / "buyer.toml").read_text().replace('"train.safetensors"', '"train-2.safetensors"'))
    stale = _cli("value", "buyer-train2.toml", "--sellers", "inproc-requery.toml", "--out", "stale-train",
                 "--prepared", "query-requery", cwd=workspace)
    assert stale.returncode == 2 and "data.train of buyer-train2.toml changed" in stale.stderr
