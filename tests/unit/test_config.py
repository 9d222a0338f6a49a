"""Settings: defaults, TOML files, overrides, errors that name the bad key, one declaration per
setting (help, docs table, seller serve flags) and the quick preset as effective settings."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.settings import QUICK, SimulationConfig, config_from_dict
from simulations.settings import load_config as load_simulation
from tip_fed.config import (
    DISCLOSURES,
    PRECONDITIONER_KINDS,
    PROJECTION_KINDS,
    RUNTIMES,
    BuyerSettings,
    FlowerConfig,
    GrpcConfig,
    ProtocolConfig,
    SellerBudgetConfig,
    SellerConfig,
    TipConfig,
    apply_overrides,
    load_config,
)
from tip_fed.errors import ConfigError, TipError
from tip_fed.toml_files import describe

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip():
    config = load_config()
    assert config == TipConfig()
    data = config.to_dict()
    assert data["crypto"]["coeff-mod-bit-sizes"] == [60, 40, 40, 60]
    assert load_config(None, []) == config
    assert load_simulation() == config_from_dict(SimulationConfig().to_dict()) == SimulationConfig()


def test_causal_toml_loads_with_overrides():
    config = load_simulation(
        ROOT / "configs" / "causal.toml", ["seed=7", "projection.rank=4", "causal.seller-classes=[[1],[4]]"]
    )
    assert config.seed == 7
    assert config.projection.rank == 4
    assert config.causal.seller_classes == ((1,), (4,))
    assert config.protocol.disclosure == "per-sample"


def test_the_library_config_refuses_scenario_sections(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'causal'"):
        load_config(ROOT / "configs" / "causal.toml")


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["nope=1"], "unknown key 'nope'"),
        (["projection.nope=1"], "unknown key 'projection.nope'"),
        (["projection.rank='x'"], "projection.rank must be an integer"),
        (["projection.rank=0"], "projection.rank must be >= 1"),
        (["projection.kind=sparse"], "projection.kind must be one of rademacher, gaussian"),
        (["preconditioner.kind=newton"], "preconditioner.kind must be one of"),
        (["protocol.disclosure=everything"], "protocol.disclosure"),
        (["runtime=cloud"], "runtime must be one of"),
        (["quick=3"], "quick must be true or false"),
        (["crypto=1"], "'crypto' is a table"),
        (["seed"], "must look like key=value"),
        (["seed=-1"], "seed must be in [0, 9223372036854775807]"),
        (["seed=9223372036854775808"], "seed must be in [0, 9223372036854775807]"),
        (["flower.timeout-s=inf"], "flower.timeout-s must be a finite number > 0"),
        (["healthcare.label-noise=[0.1, 1.5]"], "healthcare.label-noise each entry must be in [0, 1]"),
        (["causal.buyer-classes=[1, 10]"], "causal.buyer-classes each entry must be in [0, 9]"),
        (["seller.max-exact=-2"], "seller.max-exact must be >= 0"),
        (["llm-corpus.n-head=0"], "llm-corpus.n-head must be >= 1"),
        (["causal.seller-classes=[[1]]"], "needs at least two sellers"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_simulation(None, override)
    assert fragment in str(info.value)
    assert isinstance(info.value, TipError)


def test_sections_made_in_code_are_checked_like_loaded_ones():
    # the declared bounds hold for every instance, not only for what a file or --set gives
    with pytest.raises(ConfigError, match=r"flower\.wave-size must be >= 1 \(most Offers in flight at once\), got 0"):
        FlowerConfig(wave_size=0)
    with pytest.raises(ConfigError, match=r"protocol\.disclosure must be one of aggregate, per-sample"):
        ProtocolConfig(disclosure="all")
    with pytest.raises(ConfigError, match=r"grpc\.max-message-mb must be in \[4, 2048\)"):
        GrpcConfig(max_message_mb=2048)
    with pytest.raises(ConfigError, match=r"protocol\.dp-epsilon must be a finite number > 0"):
        ProtocolConfig(dp_epsilon=float("nan"))
    assert GrpcConfig(max_message_mb=2047).max_message_mb == 2047 and ProtocolConfig(dp_epsilon=None).dp_epsilon is None


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_simulation(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_overrides_parse_toml_literals_and_bare_words():
    data = apply_overrides({}, ["a.b=1.5", "a.c=true", "d=hello", "e=[1, 2]"])
    assert data == {"a": {"b": 1.5, "c": True}, "d": "hello", "e": [1, 2]}


# ---- one declaration per setting ----


def test_every_setting_has_help_and_a_unique_key():
    declared = describe(SimulationConfig)
    keys = [d.key for d in declared]
    assert len(keys) == len(set(keys)) and len(keys) > 90
    assert [d.key for d in declared if len(d.help) < 10] == []


def test_docs_list_every_setting_and_are_current():
    from tip_fed.cli import settings_text

    doc = (ROOT / "docs" / "settings.md").read_text()
    listed = re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M)
    assert sorted(listed) == sorted(d.key for d in describe(SimulationConfig))
    assert doc == settings_text(markdown=True), "regenerate: tip-fed settings --markdown > docs/settings.md"


def test_allowed_values_are_the_ones_the_code_uses():
    # each list is declared once (tip_fed.kinds); the settings and the modules that act on it import it
    from tip_fed.core import precondition, projection

    assert projection.KINDS is PROJECTION_KINDS and precondition.KINDS is PRECONDITIONER_KINDS
    for key in ("projection.kind", "preconditioner.kind", "protocol.disclosure"):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [f"{key}=nonsense"])
    from simulations.exchanges import EXCHANGES
    from tip_fed.protocol.offer import DISCLOSURE_NAMES

    assert tuple(DISCLOSURE_NAMES) == DISCLOSURES  # every allowed disclosure has its wire value
    assert sorted(EXCHANGES) == sorted(RUNTIMES)  # every allowed runtime can run a simulation


def test_buyer_settings_are_the_library_roots_first_part():
    config = load_config(None, ["seed=5", "batch-size=8", "projection.rank=3", "grpc.retries=0"])
    settings = config.buyer_settings()
    assert type(settings) is BuyerSettings
    assert (settings.seed, settings.batch_size, settings.projection.rank) == (5, 8, 3)
    assert BuyerSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ConfigError, match="unknown key 'flower'"):
        BuyerSettings.from_dict(config.to_dict())


def test_seller_serve_flags_are_the_seller_sections():
    from tip_fed.cli import _parser

    serve = _parser()._subparsers._group_actions[0].choices["seller"]._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a for a in serve._actions}
    for cls, section in ((SellerConfig, "seller"), (SellerBudgetConfig, "seller-budget")):
        for f in dataclasses.fields(cls):
            action = flags[f.name]
            assert f.metadata["help"] in action.help and f"config {section}." in action.help


def test_seller_policy_follows_the_flags():
    from tip_fed.cli import _parser, _section_from_args
    from tip_fed.protocol import SellerPolicy

    args = _parser().parse_args(["seller", "serve", "--data", "d.csv", "--port", "0", "--max-exact", "-1",
                                 "--dp-epsilon", "2", "--model-cache-mb", "0", "--offer-memory-mb", "100",
                                 "--in-flight-memory-mb", "100"])
    policy = SellerPolicy.from_config(_section_from_args(SellerConfig, "seller", args),
                                      _section_from_args(SellerBudgetConfig, "seller-budget", args))
    assert policy.lifetime.max_exact is None and policy.lifetime.total_max_exact == 16
    assert policy.noise.epsilon == 2.0 and policy.model_cache_mb == 0 and policy.budget.offer_memory_mb == 100
    bad = _parser().parse_args(["seller", "serve", "--data", "d.csv", "--port", "0", "--offer-memory-mb", "9000"])
    with pytest.raises(ConfigError, match="--in-flight-memory-mb must be >= --offer-memory-mb"):
        _section_from_args(SellerBudgetConfig, "seller-budget", bad)


def test_a_seller_policy_made_in_code_has_the_config_defaults(tmp_path):
    """``SellerPolicy()`` answers as ``tip-fed seller serve`` with no flags does (one typed config), the
    ledger aside: in memory in code, a file beside the data once served."""
    from tip_fed.protocol import SellerPolicy

    assert SellerPolicy() == SellerPolicy.from_config(SellerConfig(), SellerBudgetConfig())
    assert SellerPolicy().model_cache_mb == SellerConfig().model_cache_mb == 2048
    assert SellerPolicy().ledger is None
    served = SellerPolicy().beside(tmp_path / "clinic.csv")
    assert served.ledger == str(tmp_path / "clinic.csv.ledger.json")
    assert SellerPolicy(ledger="/srv/l.json").beside(tmp_path / "clinic.csv").ledger == "/srv/l.json"


def test_seller_serve_config_file_sets_what_flags_do_not(tmp_path):
    from tip_fed.cli import _parser, _section_from_args

    conf = tmp_path / "seller.toml"
    conf.write_text("[seller]\nmax-exact = -1\ndp-epsilon = 4.0\n[seller-budget]\nmax-calls = 5\n")
    args = _parser().parse_args(["seller", "serve", "--data", "d.csv", "--port", "0", "--config", str(conf),
                                 "--max-calls", "7", "--dp-epsilon", "2"])
    seller = _section_from_args(SellerConfig, "seller", args)
    assert (seller.max_exact, seller.dp_epsilon, seller.total_max_exact) == (-1, 2.0, 16)
    assert _section_from_args(SellerBudgetConfig, "seller-budget", args).max_calls == 7
    conf.write_text("[seller]\nmax-exact = -5\n")
    with pytest.raises(ConfigError, match=r"seller\.max-exact must be >= 0"):
        _section_from_args(SellerConfig, "seller", _parser().parse_args(
            ["seller", "serve", "--data", "d.csv", "--port", "0", "--config", str(conf)]))


def test_settings_command_lists_every_setting_before_heavy_imports():
    code = ("import sys; from tip_fed.cli import main; main(['settings']); "
            "print(sorted(m for m in ('torch', 'tenseal', 'grpc', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip().endswith("[]")
    assert all(f"\n{d.key} = " in "\n" + out for d in describe(SimulationConfig))


# ---- quick is a preset the config records ----


def test_quick_preset_is_applied_to_the_typed_config_and_recorded():
    config = load_simulation(ROOT / "configs" / "healthcare.toml", ["quick=true"])
    assert config.healthcare.replicates == QUICK["healthcare"]["replicates"]
    assert config.llm_corpus.doc_sellers == QUICK["llm_corpus"]["doc_sellers"]
    recorded = config.to_dict()
    assert recorded["healthcare"]["replicates"] == QUICK["healthcare"]["replicates"]
    assert config_from_dict(recorded) == config  # a manifest's config loads back to the same settings
    assert dataclasses.replace(SimulationConfig(), quick=True).healthcare == config.healthcare.__class__(
        **{**dataclasses.asdict(SimulationConfig().healthcare), **QUICK["healthcare"]})
    assert load_simulation(ROOT / "configs" / "healthcare.toml").healthcare.replicates != 3
