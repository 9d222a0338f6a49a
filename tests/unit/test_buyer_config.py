"""buyer.toml and sellers.toml: every mistake is a ConfigError naming the key and the fix, found
before anything heavy runs; paths are relative to the TOML file."""

import pytest
import torch
from safetensors.torch import save_file

from tip_fed.buyer_config import load_buyer_config, load_model, load_sellers_config
from tip_fed.cli import main
from tip_fed.core.models import MLP
from tip_fed.errors import ConfigError, ModelError
from tip_fed.protocol.data import save_dataset

GOOD = """seed = 3
[model]
task = "classification"
mlp = [10, 4, 2]
weights = "w.safetensors"
[data]
objective = "obj.safetensors"
[projection]
rank = 4
[payouts]
budget = 50.0
"""


@pytest.fixture
def buyer_dir(tmp_path):
    torch.manual_seed(0)
    save_file(MLP([10, 4, 2]).state_dict(), str(tmp_path / "w.safetensors"))
    save_dataset({"x": torch.randn(5, 10), "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "obj.safetensors")
    return tmp_path


def _write(d, text, name="buyer.toml"):
    (d / name).write_text(text)
    return d / name


def test_good_buyer_config_resolves_paths_and_settings(buyer_dir, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_buyer_config(_write(buyer_dir, GOOD))
    assert cfg.objective == buyer_dir / "obj.safetensors" and cfg.train is None
    assert (cfg.task, cfg.seed, cfg.projection.rank, cfg.payouts.budget) == ("classification", 3, 4, 50.0)
    assert cfg.settings().seed == 3
    model = load_model(cfg.model)
    assert isinstance(model, MLP) and model.sizes == [10, 4, 2]


@pytest.mark.parametrize("edit, message", [
    (lambda t: "colour = 1\n" + t, "unknown key 'colour'"),
    (lambda t: t.replace("[projection]\nrank = 4", "[projection]\nrnak = 4"), "unknown setting 'projection.rnak'"),
    (lambda t: t.replace("rank = 4", "rank = 0"), "projection.rank must be >= 1"),
    (lambda t: t.replace('task = "classification"', 'task = "regression"'), "model.task = 'regression' is unknown"),
    (lambda t: t.replace('task = "classification"\n', ""), "model.task is missing"),
    (lambda t: t.replace("obj.safetensors", "nope.safetensors"), "data.objective = 'nope.safetensors': file"),
    (lambda t: t.replace("mlp = [10, 4, 2]", 'mlp = [10, 4, 2]\npath = "."'), "exactly one of path"),
    (lambda t: t.replace('weights = "w.safetensors"\n', ""), "model.mlp needs model.weights"),
    (lambda t: t.replace("[data]", "[data]\nformat = \"parquet\""), "data.format = 'parquet' is not supported"),
    (lambda t: t.replace("seed = 3", "seed = -1"), "seed must be an integer"),
    (lambda t: t.replace("[model]", "[modle]"), "unknown key 'modle'"),
])
def test_bad_buyer_config(buyer_dir, edit, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_buyer_config(_write(buyer_dir, edit(GOOD)))


def test_weights_that_do_not_fit_the_model(buyer_dir):
    cfg = load_buyer_config(_write(buyer_dir, GOOD.replace("[10, 4, 2]", "[10, 8, 2]")))
    with pytest.raises(ModelError, match="do not fit the model"):
        load_model(cfg.model)


def test_sellers_config(tmp_path):
    save_dataset({"x": torch.randn(3, 10), "y": torch.zeros(3, dtype=torch.long)}, tmp_path / "a.safetensors")
    (tmp_path / "ca.crt").write_text("x")
    cfg = load_sellers_config(_write(tmp_path, 'runtime = "grpc"\n[tls]\nca = "ca.crt"\n[grpc]\ntimeout-s = 5\n'
                                     '[[sellers]]\nid = "a"\nendpoint = "127.0.0.1:1"\n', "s.toml"))
    assert cfg.tls.ca == tmp_path / "ca.crt" and cfg.grpc.timeout_s == 5 and cfg.sellers[0].endpoint == "127.0.0.1:1"
    cfg = load_sellers_config(_write(tmp_path, 'runtime = "inprocess"\n[[sellers]]\nid = "a"\ndata = "a.safetensors"\n',
                                     "s.toml"))
    assert cfg.sellers[0].data == tmp_path / "a.safetensors"


@pytest.mark.parametrize("text, message", [
    ('runtime = "carrier-pigeon"\n[[sellers]]\nid = "a"\n', "runtime = 'carrier-pigeon' is unknown"),
    ('runtime = "grpc"\n[tls]\ninsecure = true\n[[sellers]]\nid = "a"\n', r"sellers\[0\].endpoint must be host:port"),
    ('runtime = "grpc"\n[[sellers]]\nid = "a"\nendpoint = "h:1"\n', "needs \\[tls\\] ca"),
    ('runtime = "grpc"\n[tls]\ninsecure = true\n[[sellers]]\nid = "a"\nendpoint = "h:1"\n'
     '[[sellers]]\nid = "a"\nendpoint = "h:2"\n', "listed twice"),
    ('runtime = "grpc"\n[tls]\ninsecure = true\n[[sellers]]\nid = "a"\nendpoint = "h:1"\nport = 3\n',
     r"unknown key 'sellers\[0\].port'"),
    ('runtime = "grpc"\n[tls]\ninsecure = true\n[grpc]\ntimeout-s = 0\n[[sellers]]\nid = "a"\nendpoint = "h:1"\n',
     "grpc.timeout-s must be > 0"),
    ('runtime = "inprocess"\n[[sellers]]\nid = "a"\n', r"sellers\[0\].data is missing"),
    ('runtime = "inprocess"\n', r"\[\[sellers\]\]"),
])
def test_bad_sellers_config(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sellers_config(_write(tmp_path, text, "s.toml"))


def test_flower_runtimes_parse_but_are_not_wired_to_value(buyer_dir, capsys):
    _write(buyer_dir, GOOD)
    _write(buyer_dir, 'runtime = "flower-simulation"\n[[sellers]]\nid = "a"\ndata = "obj.safetensors"\n', "s.toml")
    code = main(["value", str(buyer_dir / "buyer.toml"), "--sellers", str(buyer_dir / "s.toml"),
                 "--out", str(buyer_dir / "out")])
    assert code == 2 and "not wired" in capsys.readouterr().err


def test_cli_reports_config_errors_in_one_line(buyer_dir, capsys):
    _write(buyer_dir, "colour = 1\n" + GOOD)
    assert main(["buyer", "prepare", str(buyer_dir / "buyer.toml"), "--out", str(buyer_dir / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tip-fed: error: buyer.toml: unknown key 'colour'") and err.count("\n") == 1
    assert not (buyer_dir / "q").exists()


def test_config_errors_come_before_heavy_imports(buyer_dir):
    """A typo in either file is reported before torch, TenSEAL or grpcio load."""
    import subprocess
    import sys

    _write(buyer_dir, "colour = 1\n" + GOOD)
    _write(buyer_dir, 'runtime = "grpc"\n[[sellers]]\nid = "a"\nendpoint = "h:1"\n', "s.toml")
    code = ("import sys; from tip_fed.cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'tenseal', 'grpc') if m in sys.modules))")
    for args in (["buyer", "prepare", "buyer.toml", "--out", "q"],
                 ["value", "buyer.toml", "--sellers", "s.toml", "--out", "o"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=buyer_dir, capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.strip() == "[]" and proc.stderr.startswith("tip-fed: error:"), proc.stderr
