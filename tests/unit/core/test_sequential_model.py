"""Plain torch models as data: a flat nn.Sequential of standard layers, described and rebuilt.

A buyer's ordinary ``nn.Sequential`` must travel to sellers as a JSON list of layers and come back
computing the same function; a model declared in TOML must build; anything else, and any hostile
spec, must be a ModelError that names what is supported, raised before a module is built.
"""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from torch import nn

from tip_fed.core import models, sequential
from tip_fed.core.models import MLP, describe, sequential_from_spec
from tip_fed.errors import ModelError, ProtocolError
from tip_fed.protocol.model import decode_model, encode_model, fingerprint


def test_describe_gives_the_documented_json_list():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10, bias=False))
    assert describe(model) == ("sequential", {"layers": [
        {"type": "Linear", "in_features": 64, "out_features": 32, "bias": True},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 32, "out_features": 10, "bias": False},
    ]})


def test_every_supported_layer_round_trips_through_an_offer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16, eps=1e-3), nn.GELU(approximate="tanh"),
        nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(16, 8), nn.SiLU(), nn.Tanh(),
        nn.Linear(8, 8), nn.Sigmoid(), nn.ELU(0.5), nn.Softplus(beta=2.0), nn.Mish(), nn.Identity(),
        nn.LayerNorm([8], elementwise_affine=False), nn.ReLU(), nn.Linear(8, 3),
    ).eval()
    with torch.no_grad():  # non-default LayerNorm weights, so a lost affine would show
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 3, 4)

    payload = encode_model(model)
    rebuilt = decode_model(payload, expected_fingerprint=payload.fingerprint)

    assert payload.architecture == "sequential"
    assert [type(m) for m in rebuilt] == [type(m) for m in model]
    assert rebuilt[3].approximate == "tanh" and rebuilt[5].negative_slope == 0.2 and rebuilt[12].alpha == 0.5
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert sequential.spec_parameter_count(json.loads(payload.config_json)["layers"]) == sum(
        p.numel() for p in model.parameters())


def test_float64_sequential_comes_back_float64():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    rebuilt = decode_model(encode_model(model))
    x = torch.randn(6, 4, dtype=torch.float64)
    assert rebuilt[0].weight.dtype == torch.float64
    assert torch.equal(rebuilt(x), model(x))


def test_a_model_declared_in_toml_builds():
    text = """
    [[model.layers]]
    type = "Linear"
    in_features = 64
    out_features = 32

    [[model.layers]]
    type = "GELU"

    [[model.layers]]
    type = "Linear"
    in_features = 32
    out_features = 10
    bias = false
    """
    model = sequential_from_spec(tomllib.loads(text)["model"]["layers"])
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear]
    assert model[0].weight.shape == (32, 64) and model[2].bias is None
    assert model(torch.randn(2, 64)).shape == (2, 10)


def test_declared_model_with_a_weights_file_reproduces_the_trained_model(tmp_path):
    torch.manual_seed(2)
    trained = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    spec = describe(trained)[1]["layers"]
    models.save_weights(trained, tmp_path / "w.safetensors")

    declared = models.load_weights(sequential_from_spec(json.loads(json.dumps(spec))), tmp_path / "w.safetensors")

    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(declared(x), trained(x))
    with pytest.raises(ModelError, match="do not fit"):
        models.load_weights(sequential_from_spec(spec[:1]), tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        models.load_weights(declared, tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x03pickle")
    with pytest.raises(ModelError, match="not a safetensors file"):
        models.load_weights(declared, tmp_path / "bad.safetensors")


def test_mlp_keeps_its_own_architecture():
    payload = encode_model(MLP([8, 6, 3]))
    assert payload.architecture == "mlp"
    assert isinstance(decode_model(payload), MLP)


class Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(("model", "message"), [
    (Custom(), "cannot describe a .*Custom.*supported: tip_fed MLP, a flat torch.nn.Sequential"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), "layer '0' is a torch.nn.modules.conv.Conv2d"),
    (nn.Sequential(nn.Linear(2, 2), Custom()), "layer '1' is a .*Custom"),
    (nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU()), "flatten it"),
    (nn.Sequential(__import__("collections").OrderedDict(fc=nn.Linear(2, 2))), "named"),
])
def test_unsupported_models_name_what_is_supported(model, message):
    with pytest.raises(ModelError, match=message) as info:
        encode_model(model)
    if "layer '" in message:
        assert "Linear, ReLU, GELU, Tanh, Sigmoid, SiLU" in str(info.value)


class _Counting(nn.Linear):
    built = 0

    def __init__(self, *args, **kwargs):
        type(self).built += 1
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([{"type": "ReLU"}] * 10**6, "at most 1024 layers, this one lists 1000000 .refused before building it"),
        (
            [{"type": "Linear", "in_features": 10, "out_features": 10**9}],
            r"out_features must be an integer in \[1, 1048576\]",
        ),
        (
            [{"type": "Linear", "in_features": 1 << 20, "out_features": 1 << 20}] * 4,
            "at most 2147483648 parameters, this one declares 4398050705408 .refused before building it",
        ),
        ([{"type": "LayerNorm", "normalized_shape": [1 << 20] * 3}], "at most 2147483648 parameters"),
        ([{"type": "Linear", "in_features": True, "out_features": 3}], "in_features must be an integer"),
        ([{"type": "Linear", "in_features": 3}], "needs 'out_features'"),
        ([{"type": "Linear", "in_features": 3, "out_features": 3, "device": "cuda"}], "unknown arguments"),
        ([{"type": "Dropout", "p": float("nan")}], "p must be a finite number"),
        ([{"type": "Conv2d", "in_channels": 1}], "type 'Conv2d'.*only: Linear, ReLU"),
        ([{"type": "__import__"}], "only: Linear"),
        (["ReLU"], "must be an object"),
        ([], "at least one layer"),
    ],
)
def test_hostile_or_malformed_specs_are_refused_before_building(monkeypatch, layers, message):
    monkeypatch.setattr(sequential.LAYERS["Linear"], "cls", _Counting)
    _Counting.built = 0
    with pytest.raises(ModelError, match=message):
        models.build("sequential", {"layers": layers})
    assert _Counting.built == 0


def test_hostile_spec_in_a_signed_payload_is_refused_by_the_seller_side_decoder():
    """Anyone can recompute the fingerprint: the spec's bounds, not the fingerprint, protect the seller."""
    payload = encode_model(nn.Sequential(nn.Linear(4, 2)))
    for layers in (
        [{"type": "Linear", "in_features": 10**9, "out_features": 10**9}],
        [{"type": "Linear", "in_features": 4, "out_features": 2}] + [{"type": "ReLU"}] * 2000,
    ):
        payload.config_json = json.dumps({"layers": layers})
        payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
        with pytest.raises(ModelError, match=r"must be an integer in|refused before building"):
            decode_model(payload)
    payload.config_json = json.dumps({"layers": [{"type": "Linear", "in_features": 4, "out_features": 3}]})
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match="has 15 parameters but the offer ships 10 weights"):
        decode_model(payload)
    payload.config_json = json.dumps({"layers": [], "extra": 1})
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match=r"is \{\"layers\": \[...\]\}"):
        decode_model(payload)


def test_deeply_nested_config_is_a_protocol_error():
    payload = encode_model(nn.Sequential(nn.Linear(4, 2)))
    payload.config_json = '{"layers": ' + "[" * 30_000 + "]" * 30_000 + "}"
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_model(payload)
