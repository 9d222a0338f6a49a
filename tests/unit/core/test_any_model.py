"""Models a buyer actually has: transformers architectures from config or a local directory.

Each tiny model is built from its config with a fixed seed, saved with ``save_pretrained``, loaded
back with :func:`load_local`, shipped through ``encode_model``/``decode_model``, and must give
identical logits. Projected per-sample gradients at full rank (identity projection) are checked
against an independent reference: each sample alone and unpadded, ``loss.backward()``, the layer's
``.grad``. A weight tied to the input embedding is untied in the reference's copy, so its ``.grad``
is the gradient through the projected layer itself (what a LoGra-style layer projection measures).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from tip_fed.core import models
from tip_fed.core.gradients import kfac_statistics, projected_grads
from tip_fed.core.models import tied_aliases
from tip_fed.core.projection import ProjectionSpec, projection_matrices
from tip_fed.core.tasks import get_task
from tip_fed.errors import ModelError
from tip_fed.protocol.model import decode_model, encode_model, fingerprint

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 64}
DECODER = {**SMALL, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
CASES = {
    "gpt2": ("GPT2LMHeadModel", {"vocab_size": VOCAB, "n_positions": 64, "n_layer": 2, "n_embd": 32, "n_head": 2,
                                 "bos_token_id": 0, "eos_token_id": 0}),
    "bert": ("BertForSequenceClassification", {**SMALL, "hidden_size": 32, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "intermediate_size": 48, "num_labels": 3}),
    "llama": ("LlamaForCausalLM", DECODER),
    "qwen2": ("Qwen2ForCausalLM", DECODER),
    "opt": ("OPTForCausalLM", {**SMALL, "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "word_embed_proj_dim": 32, "pad_token_id": 0}),
    "qwen2-seqcls": ("Qwen2ForSequenceClassification", {**DECODER, "num_labels": 2, "pad_token_id": 0}),
}


def tiny(case: str) -> torch.nn.Module:
    """The case's model built from its config alone, seeded."""
    model_class, config = CASES[case]
    torch.manual_seed(7)
    return models.build("transformers", {"model_class": model_class,
                                         "config": {**config, "model_type": case.split("-")[0]}})


def batch_for(model: torch.nn.Module, n: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    """Right-padded token batch (pad id 0) with labels when the model classifies."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, n):
        mask[row, length - 2 * row:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if type(model).__name__.endswith("ForSequenceClassification"):
        batch["labels"] = torch.arange(n) % model.config.num_labels
    return batch


def task_of(model: torch.nn.Module) -> str:
    return "sequence-classification" if type(model).__name__.endswith("ForSequenceClassification") else "causal-lm"


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_grads(model: torch.nn.Module, spec: ProjectionSpec, task: str, batch: dict) -> torch.Tensor:
    """Per-sample projected gradients, one unpadded sample at a time with ``loss.backward()``."""
    conv1d = transformers.pytorch_utils.Conv1D
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        alone = copy.deepcopy(model)
        modules = dict(alone.named_modules())
        for layer in spec.layers:  # untie: .grad must be this layer's own gradient
            module = modules[layer.name]
            module.weight = torch.nn.Parameter(module.weight.detach().clone())
        real = batch["attention_mask"][i] != 0
        single = {k: (v[i:i + 1, real] if v.dim() == 2 else v[i:i + 1]) for k, v in batch.items()}
        alone.zero_grad()
        get_task(task).per_sample_loss(alone, single).sum().backward()
        blocks = []
        for layer in spec.layers:
            module = modules[layer.name]
            grad = module.weight.grad.T if isinstance(module, conv1d) else module.weight.grad
            if layer.bias:
                grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
            p_in, p_out = projection_matrices(spec, layer, torch.float64)
            blocks.append((p_out @ grad @ p_in.T).reshape(-1))
        rows.append(torch.cat(blocks))
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_local_directory_round_trip_and_gradients(case, tmp_path):
    # Prepare: built from config, saved as a user's save_pretrained directory
    built = tiny(case)
    built.save_pretrained(tmp_path / case)
    batch = batch_for(built)

    # Execute: load offline, ship to a seller, rebuild
    loaded = models.load_local(tmp_path / case)
    payload = encode_model(loaded)
    rebuilt = decode_model(payload, expected_fingerprint=payload.fingerprint)

    # Assert: same class, same logits, ties survive, tied tensors travel once
    assert type(loaded) is type(built) is type(rebuilt)
    assert payload.architecture == "transformers"
    assert json.loads(payload.config_json)["model_class"] == CASES[case][0]
    reference = logits(built, batch)
    assert torch.equal(logits(loaded, batch), reference)
    assert torch.equal(logits(rebuilt, batch), reference)
    assert tied_aliases(rebuilt) == tied_aliases(built)
    for alias, original in tied_aliases(rebuilt).items():
        assert rebuilt.get_parameter(alias) is rebuilt.get_parameter(original)
    shipped = set(json.loads(payload.weights[8:8 + int.from_bytes(payload.weights[:8], "little")]))
    assert not shipped & set(tied_aliases(built))

    # Assert: projected per-sample gradients at full rank equal the loop-and-backward reference
    model = rebuilt.double()
    spec = ProjectionSpec.for_model(model, rank=10**6, seed=3)
    assert all(layer.rank_in == layer.in_dim and layer.rank_out == layer.out_features for layer in spec.layers)
    task = task_of(model)
    grads = projected_grads(model, spec, task, batch)
    expected = reference_grads(model, spec, task, batch)
    assert grads.shape == expected.shape == (3, spec.dim)
    torch.testing.assert_close(grads, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    stats = kfac_statistics(model, spec, task, [batch])
    assert set(stats) == {layer.name for layer in spec.layers}
    real_tokens = int(batch["attention_mask"].sum())
    for name, layer_stats in stats.items():
        assert layer_stats.num_samples == 3
        # per-token layers count real tokens only; a classifier head sees one (pooled) row per sample
        assert layer_stats.num_tokens == (3 if name == "classifier" or "pooler" in name
                                          else real_tokens), name
        for factor in (layer_stats.activation_sum, layer_stats.gradient_sum):
            assert torch.isfinite(factor).all() and torch.allclose(factor, factor.T)
            assert torch.linalg.eigvalsh(factor).min() > -1e-9 * float(factor.abs().max())


def test_tied_weights_shipped_twice_still_load_and_must_agree():
    model = tiny("llama")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # both tied names present
    from safetensors.torch import save

    payload = encode_model(model)
    payload.weights = save(state)
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    rebuilt = decode_model(payload)
    assert torch.equal(logits(rebuilt, batch_for(model)), logits(model, batch_for(model)))
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    payload.weights = save(state)
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match="one tied tensor"):
        decode_model(payload)


def test_untied_model_keeps_both_tensors():
    model_class, config = CASES["llama"]
    torch.manual_seed(0)
    model = models.build("transformers", {"model_class": model_class,
                                          "config": {**config, "tie_word_embeddings": False, "model_type": "llama"}})
    rebuilt = decode_model(encode_model(model))
    assert tied_aliases(rebuilt) == {}
    assert torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(rebuilt.lm_head.weight, rebuilt.model.embed_tokens.weight)


def test_left_padded_batches_for_decoders():
    """Left padding (position ids from the mask) gives each sample's unpadded loss for Llama/Qwen2/OPT."""
    for case in ("llama", "qwen2", "opt"):
        model = tiny(case).double()
        right = batch_for(model)
        left = {k: torch.stack([torch.roll(row, int((row == 0).sum())) for row in v]) for k, v in
                {"input_ids": right["input_ids"], "attention_mask": right["attention_mask"]}.items()}
        task = get_task("causal-lm")
        with torch.no_grad():
            torch.testing.assert_close(task.per_sample_loss(model, left), task.per_sample_loss(model, right))


# ---------------------------------------------------------------- refusals

def _transformers_payload(model_class: str, config: dict) -> dict:
    return {"model_class": model_class, "config": config}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            _transformers_payload(
                "LlamaForCausalLM", {**DECODER, "model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}
            ),
            "auto_map is refused",
        ),
        (
            _transformers_payload("LlamaForCausalLM", {**DECODER, "model_type": "llama", "trust_remote_code": True}),
            "trust_remote_code is refused",
        ),
        (
            _transformers_payload(
                "LlamaForCausalLM",
                {**DECODER, "model_type": "llama", "attn_implementation": "kernels-community/flash-attn"},
            ),
            "no hub kernels",
        ),
        (
            _transformers_payload("LlamaForCausalLM", {**DECODER, "model_type": "llama", "num_hidden_layers": 10**6}),
            "refused before building",
        ),
        (
            _transformers_payload(
                "MixtralForCausalLM", {**DECODER, "model_type": "mixtral", "num_local_experts": 10**6}
            ),
            "num_local_experts = 1000000 is above",
        ),
        (
            _transformers_payload(
                "Qwen2ForCausalLM", {**DECODER, "model_type": "qwen2", "layer_types": ["full_attention"] * 5}
            ),
            "cannot build a Qwen2ForCausalLM from this 'qwen2' config",
        ),
        (_transformers_payload("EvilForCausalLM", {"model_type": "evil"}), "model_type 'evil' is not supported"),
        (
            _transformers_payload("LlamaModel", {**DECODER, "model_type": "llama"}),
            "use LlamaForCausalLM .causal-lm. or LlamaForSequenceClassification",
        ),
        (_transformers_payload("GPT2LMHeadModel", {**DECODER, "model_type": "llama"}), "not supported for model_type"),
        (_transformers_payload("LlamaForCausalLM", {**DECODER}), "needs config.model_type"),
    ],
)
def test_unsafe_or_unsupported_transformers_configs(config, message):
    with pytest.raises(ModelError, match=message) as info:
        models.build("transformers", config)
    assert any(word in str(info.value) for word in ("supported", "refused", "fix the config"))


def test_load_local_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.load_local(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        models.load_local(tmp_path / "empty")
    saved = tmp_path / "llama"
    tiny("llama").save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    for change, message in [
        ({"architectures": ["LlamaModel"]}, "not supported for model_type 'llama'"),
        ({"architectures": []}, "names no architectures"),
        ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}, "auto_map is refused"),
        ({"model_type": "evil"}, "model_type 'evil' is not supported"),
    ]:
        (saved / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelError, match=message):
            models.load_local(saved)
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "model.safetensors").unlink()
    torch.save(tiny("llama").state_dict(), saved / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors weights only"):
        models.load_local(saved)


def test_load_pretrained_keeps_working_for_every_supported_class(tmp_path):
    tiny("qwen2").save_pretrained(tmp_path / "q")
    model = models.load_pretrained(tmp_path / "q", "Qwen2ForCausalLM", local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ModelError, match="not supported"):
        models.load_pretrained(tmp_path / "q", "Qwen2Model", local_files_only=True)


def test_custom_subclass_of_a_transformers_class_is_refused():
    class Mine(transformers.LlamaForCausalLM):
        pass

    model = Mine(transformers.LlamaConfig(**{k: v for k, v in DECODER.items()}))
    with pytest.raises(ModelError, match=r"cannot describe a .*Mine"):
        models.describe(model)


def test_a_config_asking_for_buffers_far_beyond_its_weights_is_refused(monkeypatch):
    """Buffers are never shipped, so the weights cannot bound them: the skeleton's count does."""

    class Tables(torch.nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.register_buffer("table", torch.zeros(rows), persistent=False)

    monkeypatch.setitem(models.BUILDERS, "tables", lambda config: Tables(config["rows"]))
    payload = encode_model(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    payload.architecture, payload.config_json = "tables", json.dumps({"rows": 10**12})
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match=r"1000000000000 buffer elements for 10 parameters .refused before building"):
        decode_model(payload)


def test_decoder_classifier_without_a_pad_token_is_a_model_error():
    model_class, config = CASES["qwen2-seqcls"]
    model = models.build(
        "transformers", {"model_class": model_class, "config": {**config, "pad_token_id": None, "model_type": "qwen2"}}
    )
    with pytest.raises(ModelError, match=r"set model\.config\.pad_token_id"):
        get_task("sequence-classification").per_sample_loss(model, batch_for(model))


@pytest.mark.parametrize(
    "model_type",
    [
        "mistral",
        "gemma",
        "phi3",
        "gpt_neox",
        "falcon",
        "bloom",
        "gptj",
        "roberta",
        "distilbert",
        "deberta-v2",
        "electra",
        "qwen3",
    ],
)
def test_describe_then_build_reproduces_more_architectures_on_meta(model_type):
    """Default-size configs on the meta device (no memory): the description rebuilds the same tensors."""
    tasks = models.supported_transformers()
    for task in ("causal-lm", "sequence-classification"):
        name = tasks[task].get(model_type)
        if name is None:
            continue
        with torch.device("meta"):
            model = getattr(transformers, name)(transformers.AutoConfig.for_model(model_type))
            architecture, config = models.describe(model)
            rebuilt = models.build(architecture, json.loads(json.dumps(config)))
        assert type(rebuilt) is type(model)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
        assert tied_aliases(rebuilt) == tied_aliases(model)


def test_a_transformers_config_bomb_is_refused_before_building():
    """A fingerprint anyone can recompute, a 10^10-token vocabulary: sized on the meta device, refused."""
    payload = encode_model(tiny("llama"))
    config = json.loads(payload.config_json)
    config["config"]["vocab_size"] = 10**10
    payload.config_json = json.dumps(config)
    payload.fingerprint = fingerprint(payload.architecture, payload.config_json, payload.weights)
    with pytest.raises(ModelError, match="refused before building it"):
        decode_model(payload)
