"""Per-sample losses of the built-in tasks against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from tip_fed.core.tasks import CausalLMTask, ClassificationTask, SequenceClassificationTask, Task, batch_size, get_task
from tip_fed.errors import ConfigError, DataError, ModelError


def test_registry() -> None:
    assert isinstance(get_task("classification"), ClassificationTask)
    assert isinstance(get_task("sequence-classification"), SequenceClassificationTask)
    assert isinstance(get_task("causal-lm"), CausalLMTask)
    custom = CausalLMTask()
    assert get_task(custom) is custom and isinstance(custom, Task)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("regression")


def test_batch_size_validation() -> None:
    assert batch_size({"x": torch.zeros(3, 2), "y": torch.zeros(3)}) == 3
    for bad in ({}, {"x": torch.zeros(0, 2)}, {"x": torch.zeros(3), "y": torch.zeros(2)},
                {"x": torch.tensor(1.0)}, {"x": [1, 2]}):
        with pytest.raises(DataError):
            batch_size(bad)


def test_classification_loss_is_per_sample_cross_entropy() -> None:
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    loss = ClassificationTask().per_sample_loss(model, {"x": x, "y": y})
    expected = -torch.log_softmax(model(x), dim=1)[torch.arange(5), y]
    torch.testing.assert_close(loss, expected)
    with pytest.raises(DataError, match="missing"):
        ClassificationTask().per_sample_loss(model, {"x": x})
    with pytest.raises(DataError):
        ClassificationTask().per_sample_loss(model, {"x": x, "y": y.float()})
    with pytest.raises(ModelError):
        ClassificationTask().per_sample_loss(lambda _: {"no": "logits"}, {"x": x, "y": y})


def test_sequence_classification_ignores_padding() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=2)).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([1, 0])}
    loss = SequenceClassificationTask().per_sample_loss(model, batch)
    alone = SequenceClassificationTask().per_sample_loss(
        model, {"input_ids": ids[1:, :3], "attention_mask": mask[1:, :3], "labels": torch.tensor([0])})
    torch.testing.assert_close(loss[1:], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError):
        SequenceClassificationTask().per_sample_loss(model, {**batch, "attention_mask": mask[:, :4]})


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).double().eval()


def test_causal_lm_sums_next_token_loss_over_real_tokens() -> None:
    model = tiny_gpt2()
    ids = torch.randint(1, 40, (1, 7))
    loss = CausalLMTask().per_sample_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    logits = model(input_ids=ids).logits[0]
    expected = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
    torch.testing.assert_close(loss[0], expected)

    for left in (False, True):  # the same sequence padded to 10 tokens, next to another sample
        mask = torch.zeros(2, 10, dtype=torch.long)
        padded = torch.zeros(2, 10, dtype=torch.long)
        if left:
            mask[0, 3:], padded[0, 3:] = 1, ids[0]
        else:
            mask[0, :7], padded[0, :7] = 1, ids[0]
        mask[1], padded[1] = 1, torch.randint(1, 40, (10,))
        batch_loss = CausalLMTask().per_sample_loss(model, {"input_ids": padded, "attention_mask": mask})
        torch.testing.assert_close(batch_loss[0], expected, rtol=1e-10, atol=1e-10)

    with pytest.raises(DataError):
        CausalLMTask().per_sample_loss(model, {"input_ids": ids[:, :1], "attention_mask": ids[:, :1]})


def test_a_record_outside_the_model_is_a_nan_loss_of_its_own_not_a_batch_error() -> None:
    """A label outside the model's classes, or an attended token id outside its vocabulary, gives
    that record a NaN loss and leaves the others' losses as they are (it used to raise for the whole
    batch, which told a buyer whether any record held such a value)."""
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(4, 4), torch.tensor([0, 3, 2, -1])
    loss = ClassificationTask().per_sample_loss(model, {"x": x, "y": y})
    expected = -torch.log_softmax(model(x), dim=1)[torch.arange(4), y.clamp(0, 2)]
    assert torch.isnan(loss[[1, 3]]).all()
    torch.testing.assert_close(loss[[0, 2]], expected[[0, 2]])

    gpt = tiny_gpt2()
    ids = torch.randint(1, 40, (3, 6))
    mask = torch.ones_like(ids)
    clean = CausalLMTask().per_sample_loss(gpt, {"input_ids": ids, "attention_mask": mask})
    bad = ids.clone()
    bad[1, 2] = 40  # one id past the vocabulary
    bad[2, 5], mask[2, 5] = 99, 0  # out of range but padding: not read, so not a fault
    loss = CausalLMTask().per_sample_loss(gpt, {"input_ids": bad, "attention_mask": mask})
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    torch.testing.assert_close(loss[0], clean[0])
