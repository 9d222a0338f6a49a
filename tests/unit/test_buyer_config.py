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
    settings = cfg.settings()
    assert (cfg.task, settings.seed, settings.projection.rank, cfg.payouts.budget) == ("classification", 3, 4, 50.0)
    model = load_model(cfg.model)
    assert isinstance(model, MLP) and model.sizes == [10, 4, 2]


@pytest.mark.parametrize("edit, message", [
    (lambda t: "colour = 1\n" + t, "unknown key 'colour'"),
    (lambda t: t.replace("[projection]\nrank = 4", "[projection]\nrnak = 4"), "unknown key 'projection.rnak'"),
    (lambda t: t.replace("rank = 4", "rank = 0"), "projection.rank must be >= 1"),
    (lambda t: t.replace('task = "classification"', 'task = "regression"'), "model.task = 'regression' is unknown"),
    (lambda t: t.replace('task = "classification"\n', ""), "model.task is missing"),
    (lambda t: t.replace("obj.safetensors", "nope.safetensors"), "data.objective = 'nope.safetensors': file"),
    (lambda t: t.replace("mlp = [10, 4, 2]", 'mlp = [10, 4, 2]\npath = "."'), "exactly one of path"),
    (lambda t: t.replace('weights = "w.safetensors"\n', ""), "model.mlp needs model.weights"),
    (lambda t: t.replace("[data]", "[data]\nformat = \"parquet\""), "unknown key 'data.format'"),
    (lambda t: t.replace("obj.safetensors", "w.txt.bak"), "data.objective = 'w.txt.bak' has extension '.bak'"),
    (lambda t: t.replace("obj.safetensors", "obj.csv"), "data.objective = 'obj.csv' holds raw records; add a "
                                                        "[format] table"),
    (lambda t: t + '[format]\nkind = "table"\nfeatures = ["a"]\nlabel = "y"\n',
     'format.kind = "table" is fitted on the buyer\'s raw records'),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "csv"\n', "format.kind must be"),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "table"\nlabel = "y"\n',
     'format.kind = "table" needs features'),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "table"\nfeatures = ["a"]\n'
     'label = "y"\nregression = true\nclasses = [0, 1]\n', "format.classes does not go with format.regression"),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "table"\nfeatures = ["a"]\n'
     'label = "y"\ntokenizer = "t.json"\n', "unknown key 'format.tokenizer'"),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "text"\n',
     "format.tokenizer is missing and \\[model\\] path holds no tokenizer.json"),
    (lambda t: t.replace("obj.safetensors", "obj.csv") + '[format]\nkind = "text"\ntokenizer = "w.safetensors"\n'
     'max-length = 0\n', "format.max-length must be an integer >= 1"),
    (lambda t: t.replace("seed = 3", "seed = -1"), "seed must be in \\[0, 9223372036854775807\\]"),
    (lambda t: t.replace("[model]", "[modle]"), "unknown key 'modle'"),
])
def test_bad_buyer_config(buyer_dir, edit, message):
    (buyer_dir / "obj.csv").write_text("a,y\n1,0\n")
    (buyer_dir / "w.txt.bak").write_text("")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(") if "\\[" in message
                       else message.replace("[", r"\[").replace("(", r"\(")):
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


def test_flower_sellers_config(tmp_path):
    """flower-simulation / flower-deployment read one data file per seller; [superlink] (an existing
    SuperLink) instead names each seller's registered node and the key that signs the buyer's app."""
    for f in ("a.csv", "b.jsonl", "ca.crt", "publisher"):
        (tmp_path / f).write_text("x")
    cfg = load_sellers_config(_write(tmp_path, 'runtime = "flower-deployment"\n[flower]\ntimeout-s = 30\n'
                                     '[[sellers]]\nid = "a"\ndata = "a.csv"\n[[sellers]]\nid = "b"\ndata = "b.jsonl"\n',
                                     "s.toml"))
    assert cfg.files() == {"a": tmp_path / "a.csv", "b": tmp_path / "b.jsonl"} and cfg.flower.timeout_s == 30
    assert cfg.superlink is None
    cfg = load_sellers_config(_write(tmp_path, 'runtime = "flower-deployment"\nmax-samples = 50\n[superlink]\n'
                                     'address = "127.0.0.1:9093"\nroot-certificates = "ca.crt"\n'
                                     'publisher-key = "publisher"\n[[sellers]]\nid = "a"\nnode-id = 17\n', "s.toml"))
    assert cfg.superlink is not None and cfg.superlink.root_certificates == tmp_path / "ca.crt"
    assert cfg.sellers[0].node_id == 17 and cfg.files() == {}


@pytest.mark.parametrize("text, message", [
    ('runtime = "flower-simulation"\n[[sellers]]\nid = "a"\n', r"sellers\[0\].data is missing"),
    ('runtime = "flower-simulation"\n[[sellers]]\nid = "a"\ndata = "a.xlsx"\n', r"has extension '.xlsx'"),
    ('runtime = "flower-simulation"\n[flower]\nwave-size = 0\n[[sellers]]\nid = "a"\ndata = "a.csv"\n',
     "flower.wave-size must be >= 1"),
    ('runtime = "grpc"\n[superlink]\naddress = "h:1"\n[[sellers]]\nid = "a"\nendpoint = "h:1"\n',
     r"\[superlink\] goes with runtime = 'flower-deployment'"),
    ('runtime = "flower-deployment"\nmax-samples = 5\n[superlink]\naddress = "h:1"\ninsecure = true\n'
     '[[sellers]]\nid = "a"\nnode-id = 3\n', "superlink.publisher-key is missing"),
    ('runtime = "flower-deployment"\nmax-samples = 5\n[superlink]\naddress = "h:1"\npublisher-key = "a.csv"\n'
     '[[sellers]]\nid = "a"\nnode-id = 3\n', "exactly one of root-certificates"),
    ('runtime = "flower-deployment"\nmax-samples = 5\n[superlink]\naddress = "h:1"\ninsecure = true\n'
     'publisher-key = "a.csv"\n[[sellers]]\nid = "a"\n', r"sellers\[0\].node-id must be"),
    ('runtime = "flower-deployment"\n[superlink]\naddress = "h:1"\ninsecure = true\npublisher-key = "a.csv"\n'
     '[[sellers]]\nid = "a"\nnode-id = 3\n', "set max-samples"),
    ('runtime = "flower-deployment"\n[[sellers]]\nid = "a"\ndata = "a.csv"\nnode-id = 3\n',
     r"node-id goes with \[superlink\]"),
])
def test_bad_flower_sellers_config(tmp_path, text, message):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ConfigError, match=message):
        load_sellers_config(_write(tmp_path, text, "s.toml"))


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
