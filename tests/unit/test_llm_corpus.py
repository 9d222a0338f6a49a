"""The LLM-corpus market's construction at its default scale, and the decile sign check."""

from collections import Counter

import pytest

from simulations.llm_corpus import build
from simulations.replicates import decile_check
from simulations.settings import load_config
from tip_fed.errors import ConfigError


@pytest.fixture(scope="module")
def market():
    # the default config's market without its pretraining (the text, tokenizer and sellers are the same)
    return build(load_config("configs/llm_corpus.toml", ["llm-corpus.pretrain-steps=0"]))[0]


def test_default_market_has_the_papers_scale(market):
    c = load_config("configs/llm_corpus.toml").llm_corpus
    kinds = market.info["seller_kinds"]
    assert Counter(kinds.values()) == {"document": c.doc_sellers, "duplicate": c.low_sellers,
                                       "shuffled": c.low_sellers, "off-domain": c.low_sellers}
    assert c.doc_sellers >= 500 and set(kinds) == set(market.sellers)
    assert len(market.model.transformer.h) >= 4 and market.info["parameters"] > 300_000
    for sid, data in market.sellers.items():
        assert tuple(data["input_ids"].shape) == (c.max_blocks, c.block_len), sid
    # documents come from both real sources, never from the buyer's own training or objective text
    sources = Counter(s.split("-")[0] for s, k in kinds.items() if k == "document")
    assert sources["doc"] >= 50 and sources["lib"] >= 300
    source = {s: s.split("-", 1)[1].rsplit("-", 1)[0] for s, k in kinds.items() if k == "document"}
    own = set(market.info["train_topics"]) | set(market.info["objective_topics"])
    assert not any(s.startswith("doc-") and source[s] in own for s in source)
    assert not any(s.startswith("lib-") and source[s] in market.info["train_modules"] for s in source)


def test_ground_truth_sample_is_random_and_covers_every_kind(market):
    truth = market.info["truth_sellers"]
    ids = list(market.sellers)
    assert len(truth) == len(set(truth)) == 60 and set(truth) <= set(ids)
    assert truth != sorted(ids)[:60]  # not the first sellers
    assert len({market.info["seller_kinds"][s] for s in truth}) >= 2


def test_quick_variant_fine_tunes_every_seller():
    m = build(load_config("configs/llm_corpus.toml", ["quick=true", "llm-corpus.pretrain-steps=0"]))[0]
    assert sorted(m.info["truth_sellers"]) == sorted(m.sellers)


def test_doc_sellers_beyond_the_text_is_a_config_error():
    cfg = load_config("configs/llm_corpus.toml", ["llm-corpus.doc-sellers=100000", "llm-corpus.pretrain-steps=0"])
    with pytest.raises(ConfigError, match=r"llm-corpus\.doc-sellers"):
        build(cfg)


@pytest.mark.parametrize("override", ["llm-corpus.truth-sellers=-1", "llm-corpus.train-modules=-1"])
def test_negative_counts_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("configs/llm_corpus.toml", [override])


def test_decile_check_reports_both_signs():
    scores = {f"s{i}": float(i - 5) for i in range(20)}  # 5 sellers below zero

    def additive(coalition):  # a utility that is the sum of the scores: a perfectly valid score
        return sum(scores[s] for s in coalition)

    d = decile_check(scores, additive)
    assert (d["top_n"], d["top_sellers"], d["bottom_sellers"]) == (2, ["s19", "s18"], ["s1", "s0"])
    assert d["top_lowers_loss"] and d["bottom_raises_loss"] and d["top_beats_bottom"]
    assert d["top_benefit"] == 27 and d["bottom_benefit"] == -9
    shifted = decile_check(scores, lambda c: additive(c) + 10)  # every decile helps: bottom does not raise it
    assert shifted["top_lowers_loss"] and not shifted["bottom_raises_loss"]
    assert decile_check(dict(list(scores.items())[:9]), additive) is None
