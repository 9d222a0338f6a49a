"""Real raw records for seller tests: a clinical table (CSV/Parquet) and English text (JSONL).

The table is scikit-learn's breast-cancer set (569 x 30, shipped in the wheel); the text is the
docstrings of Python's standard library (real English, present wherever Python is). A buyer's
ByteLevel BPE tokenizer is trained on part of the text with the ``tokenizers`` library.
"""

from __future__ import annotations

import inspect
import json

import pandas as pd
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tip_fed.core.models import MLP
from tip_fed.core.tasks import get_task
from tip_fed.protocol import Buyer, BuyerSettings
from tip_fed.protocol.formats import TableFormat, TextFormat
from tip_fed.protocol.records import RawRecords

from .conftest import train_classifier

FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area", "worst concavity", "worst symmetry"]
LABEL = "diagnosis"


def cancer_table() -> pd.DataFrame:
    """Breast-cancer rows with six features and a text label ('malignant'/'benign'), shuffled."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer(as_frame=True)
    frame = raw.frame[FEATURES].copy()
    frame[LABEL] = [str(raw.target_names[t]) for t in raw.target]
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def train_mlp(x: torch.Tensor, y: torch.Tensor, sizes: list[int], steps: int = 100) -> MLP:
    """An MLP trained briefly with Adam on (x, y); deterministic."""
    torch.manual_seed(0)
    return train_classifier(MLP(sizes), x, y, steps)


def docstring_corpus(n: int) -> list[str]:
    """``n`` paragraphs of English from the standard library's docstrings (first paragraph each)."""
    import argparse
    import collections
    import csv
    import json as json_module
    import logging
    import pathlib
    import textwrap

    texts: list[str] = []
    for module in (argparse, collections, csv, json_module, logging, pathlib, textwrap, inspect):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                para = " ".join(doc.split("\n\n")[0].split())
                if 20 <= len(para) <= 400 and para not in texts:
                    texts.append(para)
    if len(texts) < n:
        raise RuntimeError(f"only {len(texts)} docstrings found, {n} asked")
    return texts[:n]


def train_tokenizer(texts: list[str], vocab_size: int = 300) -> Tokenizer:
    """A ByteLevel BPE tokenizer with an <|pad|> token, trained offline on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def tiny_gpt2(vocab_size: int, n_positions: int = 64) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                                  bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def write_jsonl(path, texts: list[str], **extra_fields) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"id": i, "text": text, **{k: v[i] for k, v in extra_fields.items()}}) + "\n"
            for i, text in enumerate(texts)
        )


def text_records(texts: list[str], source: str = "the records") -> RawRecords:
    return RawRecords.from_rows([{"text": t} for t in texts], source)


def table_buyer(
    mine: pd.DataFrame,
    settings: BuyerSettings,
    *,
    objective: pd.DataFrame | None = None,
    hidden: int = 8,
    steps: int = 40,
) -> Buyer:
    """A buyer whose MLP is trained on its own rows ``mine``, standardised by a TableFormat fitted on them."""
    rows = RawRecords.from_rows(mine.to_dict("records"), "buyer rows")
    fmt = TableFormat.fit(rows, FEATURES, LABEL)
    enc = fmt.encode(rows)
    model = train_mlp(enc["x"], enc["y"], [len(FEATURES), hidden, 2], steps)
    obj = rows if objective is None else RawRecords.from_rows(objective.to_dict("records"))
    return Buyer(model, get_task("classification"), objective=obj, train=rows, settings=settings, input_format=fmt)


def text_buyer(
    objective: list[str], tok: Tokenizer, settings: BuyerSettings, max_length: int, *, train: list[str] | None = None
) -> Buyer:
    """A tiny-GPT-2 causal-LM buyer whose TextFormat carries ``tok`` (pads with <|pad|>)."""
    fmt = TextFormat.from_tokenizer(tok, max_length, pad_id=tok.token_to_id("<|pad|>"))
    return Buyer(
        tiny_gpt2(tok.get_vocab_size()),
        get_task("causal-lm"),
        objective=text_records(objective),
        train=None if train is None else text_records(train),
        settings=settings,
        input_format=fmt,
    )
