"""LLM-corpus market: sellers are documents; the buyer is a small GPT-2 (or BERT) trained locally.

Text (all real, all offline): the Python language reference that ships with CPython
(``pydoc_data.topics``, 79 topics, ~465 KB) is the buyer's domain; scikit-learn's dataset
descriptions (``sklearn/datasets/descr/*.rst``) are real English from another domain. A byte-level
BPE tokenizer is trained on the buyer's own training topics; the model is built from a config
and pretrained briefly on those topics.

Sellers: one Python-doc topic each (``doc-*``), plus sellers of known low value:
``dup-*`` (one block repeated), ``shuffled-*`` (a topic's words shuffled: right vocabulary, no
language), ``offdomain-*`` (dataset descriptions). The buyer's objective is held-out topics.
BERT variant (``llm-corpus.model = "bert"``): a classifier of "is this Python documentation";
there the low-value sellers also include ``mislabeled-*`` (doc blocks labelled as other text).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
import torch

from tip_fed.config import TipConfig
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError

from simulations.market import Market

QUICK = {"doc_sellers": 8, "low_sellers": 1, "pretrain_steps": 30, "max_blocks": 4, "train_sample": 64}


def python_docs() -> dict[str, str]:
    """The Python language reference topics bundled with CPython (real text, no download)."""
    from pydoc_data.topics import topics

    return {k: v for k, v in sorted(topics.items()) if len(v) > 500}


def off_domain() -> dict[str, str]:
    """scikit-learn's dataset descriptions: real English prose about medicine, wine, housing, ..."""
    import sklearn

    files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst")))
    return {os.path.basename(f)[:-4]: open(f, encoding="utf-8").read() for f in files}


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


def _model(config: TipConfig, vocab: int) -> torch.nn.Module:
    import transformers

    c = config.llm_corpus
    if c.model == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=c.block_len, n_embd=c.n_embd, n_layer=c.n_layer,
                                      n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                                  num_attention_heads=c.n_head, intermediate_size=4 * c.n_embd,
                                  max_position_embeddings=c.block_len, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def pretrain(model: torch.nn.Module, task: Any, data: dict[str, torch.Tensor], steps: int, lr: float, seed: int) -> None:
    """AdamW on random minibatches of the buyer's training blocks (mean per-sample loss)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n = data["input_ids"].shape[0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(16, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        task.per_sample_loss(model, {k: v[idx] for k, v in data.items()}).mean().backward()
        opt.step()
    model.eval()


def build(config: TipConfig) -> list[Market]:
    """One market: buyer (tokenizer + model trained on its topics), held-out objective, document sellers."""
    c = config.llm_corpus
    rng = np.random.default_rng(config.seed)
    docs, other = python_docs(), off_domain()
    n_doc = QUICK["doc_sellers"] if config.quick else c.doc_sellers
    n_low = QUICK["low_sellers"] if config.quick else c.low_sellers
    names = list(rng.permutation(list(docs)))
    need = c.train_topics + c.objective_topics + 1
    if need > len(names):
        raise ConfigError(f"llm-corpus needs more than {need - 1} Python-doc topics for train + objective, only "
                          f"{len(names)} exist; lower llm-corpus.train-topics or objective-topics")
    train_t, obj_t = names[: c.train_topics], names[c.train_topics : c.train_topics + c.objective_topics]
    seller_t = names[c.train_topics + c.objective_topics :]
    other_names = list(rng.permutation(list(other)))
    bert = c.model == "bert"
    other_buyer = other_names[: len(other_names) // 2] if bert else []
    tok = train_tokenizer([docs[t] for t in train_t] + [other[o] for o in other_buyer], c.vocab_size)
    vocab = tok.get_vocab_size()
    L, m = c.block_len, (QUICK["max_blocks"] if config.quick else c.max_blocks)

    def labelled(rows: list[list[int]], label: int) -> dict[str, torch.Tensor]:
        return _batch(rows, [label] * len(rows) if bert else None)

    train_rows = [(b, 1) for t in train_t for b in blocks(tok, docs[t], L, 10 * m)]
    train_rows += [(b, 0) for o in other_buyer for b in blocks(tok, other[o], L, 10 * m)]
    obj_rows = [b for t in obj_t for b in blocks(tok, docs[t], L, 4)][: c.objective_blocks]
    obj_labels = [1] * len(obj_rows)
    if bert:  # the classifier's objective needs both classes
        extra = [b for o in other_buyer for b in blocks(tok, other[o], L, 2)][: len(obj_rows)]
        obj_rows, obj_labels = obj_rows + extra, obj_labels + [0] * len(extra)
    sellers: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    # documents: consecutive pieces of max_blocks blocks of the sellers' topics
    pieces = [(f"doc-{t}-{j}", rows[j : j + m]) for t in seller_t
              for rows in [blocks(tok, docs[t], L, 10**6)] for j in range(0, len(rows), m)]
    chosen = [pieces[i] for i in sorted(rng.permutation(len(pieces))[:n_doc])]
    if len(chosen) < n_doc:
        raise ConfigError(f"llm-corpus.doc-sellers = {n_doc} but the seller topics make only {len(pieces)} documents")
    for name, rows in chosen:
        sellers[name], kinds[name] = labelled(rows, 1), "document"
    for i in range(n_low):
        src = docs[seller_t[i % len(seller_t)]]
        sellers[f"dup-{i}"], kinds[f"dup-{i}"] = labelled(blocks(tok, src, L, 1) * m, 1), "duplicate"
        words = src.split()
        rng.shuffle(words)
        sellers[f"shuffled-{i}"], kinds[f"shuffled-{i}"] = labelled(blocks(tok, " ".join(words), L, m), 1), "shuffled"
        o = other_names[len(other_names) // 2 + i % max(1, len(other_names) - len(other_names) // 2)]
        sellers[f"offdomain-{i}"], kinds[f"offdomain-{i}"] = labelled(blocks(tok, other[o], L, m), 0), "off-domain"
        if bert:
            sellers[f"mislabeled-{i}"], kinds[f"mislabeled-{i}"] = labelled(blocks(tok, docs[seller_t[-1 - i]], L, m), 0), "mislabeled"
    sellers = {k: v for k, v in sellers.items() if v["input_ids"].numel() > 0}
    task = get_task("sequence-classification" if bert else "causal-lm")
    torch.manual_seed(config.seed)
    model = _model(config, vocab)
    train = _batch([r for r, _ in train_rows], [y for _, y in train_rows] if bert else None)
    pretrain(model, task, train, QUICK["pretrain_steps"] if config.quick else c.pretrain_steps, c.pretrain_lr, config.seed)
    return [Market(
        name=f"llm_corpus-{c.model}",
        model=model,
        task=task,
        # the preconditioner's (and gradient-norm bound's) sample of the buyer's data
        train={k: v[: QUICK["train_sample"] if config.quick else 256] for k, v in train.items()},
        objective=_batch(obj_rows, obj_labels if bert else None),
        sellers=sellers,
        info={"replicate": 0, "model": c.model, "vocab_size": vocab, "block_len": L,
              "text": "pydoc_data.topics (Python language reference) + sklearn/datasets/descr/*.rst",
              "train_topics": train_t, "objective_topics": obj_t, "seller_kinds": kinds},
        replicate=0,
    )]
