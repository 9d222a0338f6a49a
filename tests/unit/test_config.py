"""Config loading: defaults, TOML files, overrides, and errors that name the bad key."""

from pathlib import Path

import pytest

from tip_fed.config import TipConfig, apply_overrides, load_config
from tip_fed.errors import ConfigError, TipError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip():
    config = load_config()
    assert config == TipConfig()
    data = config.to_dict()
    assert data["crypto"]["coeff-mod-bit-sizes"] == [60, 40, 40, 60]
    assert load_config(None, []) == config


def test_causal_toml_loads_with_overrides():
    config = load_config(
        ROOT / "configs" / "causal.toml", ["seed=7", "projection.rank=4", "causal.seller-classes=[[1],[4]]"]
    )
    assert config.seed == 7
    assert config.projection.rank == 4
    assert config.causal.seller_classes == ((1,), (4,))
    assert config.protocol.disclosure == "per-sample"


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["nope=1"], "unknown setting 'nope'"),
        (["projection.nope=1"], "unknown setting 'projection.nope'"),
        (["projection.rank='x'"], "projection.rank must be an integer"),
        (["projection.rank=0"], "projection.rank must be >= 1"),
        (["preconditioner.kind=newton"], "preconditioner.kind must be one of"),
        (["protocol.disclosure=everything"], "protocol.disclosure"),
        (["runtime=cloud"], "runtime must be one of"),
        (["quick=3"], "quick must be true or false"),
        (["crypto=1"], "'crypto' is a table"),
        (["seed"], "must look like key=value"),
        (["causal.seller-classes=[[1]]"], "needs at least two sellers"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert fragment in str(info.value)
    assert isinstance(info.value, TipError)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_overrides_parse_toml_literals_and_bare_words():
    data = apply_overrides({}, ["a.b=1.5", "a.c=true", "d=hello", "e=[1, 2]"])
    assert data == {"a": {"b": 1.5, "c": True}, "d": "hello", "e": [1, 2]}
