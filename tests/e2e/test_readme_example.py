"""The README's "Value your own model" example runs as written and its scores are right.

The commands are read from README.md itself (the ``bash`` blocks of "Try it: three clinics'
tables" and the Python API block), run against a copy of ``examples/tabular/`` whose
``../../.venv/bin`` is this interpreter's environment: the setup block in bash, each seller line
as its own process (on a free port instead of the README's, the copied sellers.toml rewritten to
match; stopped by PID), the buyer's block in bash. Every decrypted seller total is checked against
a plaintext reference computed here with pandas (the buyer's rows' mean and population std) and
torch, and the README's claims about the ranking hold. The section's buyer.toml and sellers.toml
blocks load as valid configs.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.protocol import PreparedQuery

from ..conftest import free_port
from .serving import stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tabular"
CLINICS = ("clinic-a", "clinic-b", "clinic-c")



def _section(title):
    """The README lines from the heading ``title`` to the next heading of its level or higher (outside code)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    level = len(title.split(" ")[0])
    start = lines.index(title)
    out, fenced = [], False
    for line in lines[start + 1:]:
        fenced ^= line.startswith("```")
        heading = re.match(r"(#+) ", line)
        if not fenced and heading and len(heading.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out) + "\n"


def _blocks(text, lang):
    return [b.strip("\n") for b in re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)]


def _commands(block):
    """One command per entry: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def _bash(script, cwd):
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def readme():
    section = _section("### Try it: three clinics' tables")
    setup, sellers, buyer = _blocks(section, "bash")
    api = _blocks(_section("## Value your own model"), "python")
    assert len(api) == 1, "the section shows one Python block"
    return {"setup": setup, "sellers": _commands(sellers), "buyer": _commands(buyer), "api": api[0]}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, readme):
    """A copy of examples/tabular (nothing generated), where ../../.venv/bin is this environment, set up."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(EXAMPLE, root / "examples" / "tabular",
                    ignore=shutil.ignore_patterns("data", "tls", "query*", "results*", "__pycache__"))
    (root / ".venv").symlink_to(Path(sys.prefix))  # this environment, where .ci/setup puts it
    run = _bash(readme["setup"], root)
    assert run.returncode == 0, run.stdout + run.stderr
    return root / "examples" / "tabular"


def _path_export(readme):
    """The README's own PATH line, evaluated in the example directory (where it was run)."""
    return next(c for c in _commands(readme["setup"]) if c.startswith("export PATH="))


@pytest.fixture(scope="module")
def sellers(checkout, readme):
    """Each README seller line as a process on a free port; sellers.toml rewritten to match; stopped by PID."""
    toml = (checkout / "sellers.toml").read_text()
    procs, logs = {}, {}
    try:
        for command in readme["sellers"]:
            assert command.endswith("&") and command.startswith("tip-fed seller serve "), command
            readme_port = re.search(r"--port (\d+)", command).group(1)
            assert f'endpoint = "127.0.0.1:{readme_port}"' in toml, f"sellers.toml lists no seller on {readme_port}"
            port = free_port()
            toml = toml.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
            line = command[:-1].strip().replace(f"--port {readme_port}", f"--port {port}")
            proc = subprocess.Popen(["bash", "-c", f"{_path_export(readme)}; exec {line}"], cwd=checkout, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs[port], logs[port] = proc, []
        (checkout / "sellers.toml").write_text(toml)
        ready = {}
        for port, proc in procs.items():
            found = wait_ready(proc, logs[port], 180)
            assert int(found["port"]) == port and found["security"] == "mtls"
            ready[found["id"]] = int(found["n"])
        yield ready
    finally:
        for proc in procs.values():
            stop(proc)  # 'exec' made the seller the very process bash started


def _plaintext(example, prepared):
    """Each clinic's total from its CSV, encoded here: pandas standardisation with the buyer's train rows."""
    sys.path.insert(0, str(example))
    try:
        from make_example import FEATURES, LABEL, model
    finally:
        sys.path.remove(str(example))
    net = model(len(FEATURES))
    net.load_state_dict(load_file(str(example / "data" / "model.safetensors")))
    net.eval()
    train = pd.read_csv(example / "data" / "train.csv")
    mean, std = train[FEATURES].mean(), train[FEATURES].std(ddof=0)
    out = {}
    for clinic in CLINICS:
        rows = pd.read_csv(example / "data" / f"{clinic}.csv")
        batch = {"x": torch.tensor(((rows[FEATURES] - mean) / std).to_numpy(), dtype=torch.float32),
                 "y": torch.tensor((rows[LABEL] == "malignant").to_numpy(), dtype=torch.long)}
        g = projected_grads(net, prepared.spec, get_task("classification"), batch).double()
        out[clinic] = (clip_rows(g, prepared.grad_norm_bound)[0] @ prepared.query).numpy()
    return out


def _check(results, plain, prepared):
    with (results / "valuations.csv").open() as fh:
        rows = {r["seller_id"]: r for r in csv.DictReader(fh)}
    tol = 1e-6 * prepared.query_norm * prepared.grad_norm_bound  # CKKS + sanitising noise per record
    assert set(rows) == set(CLINICS)
    for clinic, scores in plain.items():
        assert int(rows[clinic]["n_samples"]) == len(scores)
        assert abs(float(rows[clinic]["score"]) - scores.sum()) <= len(scores) * tol, clinic
    return {c: float(r["score"]) for c, r in rows.items()}


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_tabular_example_runs_as_written(checkout, sellers, readme):
    # Prepare: the sellers run (fixture); the README's 'kill' line names exactly those background jobs
    assert sorted(sellers) == list(CLINICS)
    *commands, kill = readme["buyer"]
    assert kill == "kill " + " ".join(f"%{i + 1}" for i in range(len(sellers)))

    # Execute
    run = _bash(f"{_path_export(readme)}\n" + "\n".join(commands), checkout)

    # Assert
    assert run.returncode == 0, run.stdout + run.stderr
    prepared = PreparedQuery.load(checkout / "query")
    plain = _plaintext(checkout, prepared)
    scores = _check(checkout / "results", plain, prepared)
    assert (checkout / "results" / "report.md").is_file()
    # what the README says about the result
    assert scores["clinic-a"] == max(scores.values()) and scores["clinic-b"] < 0
    assert all(n == len(plain[c]) for c, n in sellers.items())


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_python_api_gives_the_plaintext_scores(checkout, readme):
    script = checkout / "api_example.py"
    script.write_text(readme["api"])
    run = subprocess.run([sys.executable, str(script)], check=False, cwd=checkout, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    prepared = PreparedQuery.load(checkout / "query-py")
    scores = _check(checkout / "results-py", _plaintext(checkout, prepared), prepared)
    assert scores["clinic-b"] < 0


@pytest.mark.e2e
def test_readme_toml_blocks_are_valid_configs(tmp_path):
    """The section's buyer.toml and sellers.toml blocks load as written (their files in place)."""
    from tip_fed.buyer_config import load_buyer_config
    from tip_fed.sellers_config import load_sellers_config

    buyer_toml, sellers_toml = _blocks(_section("## Value your own model"), "toml")
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "tokenizer.json").write_text("{}")
    for name in ("objective.jsonl", "train.jsonl"):
        (tmp_path / name).write_text('{"text": "The for statement iterates over a sequence."}\n')
    (tmp_path / "tls").mkdir()
    for name in ("ca.crt", "buyer.crt", "buyer.key"):
        (tmp_path / "tls" / name).write_text("PEM")
    (tmp_path / "buyer.toml").write_text(buyer_toml)
    (tmp_path / "sellers.toml").write_text(sellers_toml)

    buyer = load_buyer_config(tmp_path / "buyer.toml")
    sellers = load_sellers_config(tmp_path / "sellers.toml")

    assert buyer.task == "causal-lm" and buyer.input_format.kind == "text" and buyer.input_format.max_length == 256
    assert buyer.input_format.tokenizer == tmp_path / "my-model"
    assert sellers.runtime == "grpc" and [s.id for s in sellers.sellers] == ["clinic-a"]
    assert sellers.tls.cert == tmp_path / "tls" / "buyer.crt"
