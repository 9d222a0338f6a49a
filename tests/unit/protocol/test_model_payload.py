"""Model payloads: rebuild exactly, refuse tampered or unexpected weights."""

import pytest
import torch
import transformers

from tip_fed.core.models import MLP, load_pretrained
from tip_fed.errors import FingerprintMismatchError, ModelError, ProtocolError
from tip_fed.protocol.model import decode_model, encode_model


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("make", [lambda: MLP([8, 6, 3]), _gpt2])
def test_round_trip_rebuilds_identical_outputs(make):
    torch.manual_seed(1)
    model = make().eval()
    payload = encode_model(model)
    rebuilt = decode_model(payload, expected_fingerprint=payload.fingerprint)
    x = torch.randn(4, 8) if isinstance(model, MLP) else torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    a = a if isinstance(a, torch.Tensor) else a.logits
    b = b if isinstance(b, torch.Tensor) else b.logits
    assert torch.equal(a, b)


def test_tampered_weights_are_refused():
    payload = encode_model(MLP([4, 3]))
    tampered = bytearray(payload.weights)
    tampered[-1] ^= 0x01
    payload.weights = bytes(tampered)
    with pytest.raises(FingerprintMismatchError, match="altered or corrupted"):
        decode_model(payload)


def test_unexpected_model_is_refused():
    payload = encode_model(MLP([4, 3]))
    with pytest.raises(FingerprintMismatchError, match="not the one this seller was told to expect"):
        decode_model(payload, expected_fingerprint="0" * 64)


def test_unknown_architecture_and_bad_config():
    from tip_fed.protocol.model import fingerprint

    payload = encode_model(MLP([4, 3]))
    payload.architecture = "pickle"
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match="unknown model architecture"):
        decode_model(payload)
    payload = encode_model(MLP([4, 3]))
    payload.config_json = "{not json"
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_model(payload)


def test_weights_that_do_not_fit_the_architecture():
    import json

    from tip_fed.protocol.model import fingerprint

    payload = encode_model(MLP([4, 3]))
    payload.config_json = json.dumps({"sizes": [5, 3], "bias": True})
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match="do not fit"):
        decode_model(payload)


def test_load_pretrained_from_local_directory(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "gpt2-tiny")
    loaded = load_pretrained(tmp_path / "gpt2-tiny", "GPT2LMHeadModel", local_files_only=True)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)
    with pytest.raises(ModelError, match="cannot load"):
        load_pretrained(tmp_path / "missing", "GPT2LMHeadModel", local_files_only=True)
