"""buyer.toml with raw records: a [format] table turns the buyer's CSV into tensors, sellers keep
CSV / Parquet / JSONL files, and the in-process valuation equals a plaintext reference built here
independently with pandas (standardise with the train set's mean and population std, label
values to class indices); a text [format] takes the tokenizer saved with the model, checked
against transformers' own tokenizer; a [format] that does not match the data is a ConfigError
naming the key."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_breast_cancer

import tip_fed
from tip_fed.buyer_config import check_prepared, load_buyer_config, prepare_from_config
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.sequential import sequential_from_spec
from tip_fed.core.tasks import get_task
from tip_fed.errors import ConfigError
from tip_fed.market.results import read_csv
from tip_fed.protocol import Buyer
from tip_fed.protocol.formats import TableFormat

from ..conftest import train_classifier

FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area", "worst concavity", "area error"]
LABEL = "diagnosis"
TEXT_LENGTH = 16
SPEC = [{"type": "Linear", "in_features": 6, "out_features": 8}, {"type": "ReLU"},
        {"type": "Linear", "in_features": 8, "out_features": 2}]
SPEC_TOML = ('[{type = "Linear", in_features = 6, out_features = 8}, {type = "ReLU"}, '
             '{type = "Linear", in_features = 8, out_features = 2}]')
BUYER = f"""[model]
task = "classification"
sequential = {SPEC_TOML}
weights = "w.safetensors"
[data]
objective = "objective.csv"
train = "train.csv"
[format]
kind = "table"
features = {json.dumps(FEATURES)}
label = "{LABEL}"
[projection]
rank = 4
"""


def _frame():
    data = load_breast_cancer(as_frame=True)
    df = data.frame[[*FEATURES, "target"]].copy()
    df[LABEL] = np.where(df.pop("target") == 1, "benign", "malignant")
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)


def _encode(df, train):
    """The reference encoding, with pandas alone."""
    mean, std = train[FEATURES].mean(), train[FEATURES].std(ddof=0)
    x = torch.tensor(((df[FEATURES] - mean) / std).to_numpy(), dtype=torch.float32)
    classes = sorted(train[LABEL].unique())
    y = torch.tensor(df[LABEL].map({c: i for i, c in enumerate(classes)}).to_numpy(), dtype=torch.long)
    return {"x": x, "y": y}


def write_table_market(d):
    """buyer.toml (a Sequential trained on CSV train records), and three sellers' CSV, Parquet and
    JSONL files; returns the model, the train frame and the sellers' frames."""
    df = _frame()
    train, objective = df.iloc[:200], df.iloc[200:260]
    sellers = {"csv-clinic": df.iloc[260:300], "parquet-clinic": df.iloc[300:370], "jsonl-clinic": df.iloc[370:395]}
    train.to_csv(d / "train.csv", index=False)
    objective.to_csv(d / "objective.csv", index=False)
    sellers["csv-clinic"].to_csv(d / "csv-clinic.csv", index=False)
    sellers["parquet-clinic"].to_parquet(d / "parquet-clinic.parquet", index=False)
    sellers["jsonl-clinic"].to_json(d / "jsonl-clinic.jsonl", orient="records", lines=True)
    torch.manual_seed(0)
    model = sequential_from_spec(SPEC)
    enc = _encode(train, train)
    train_classifier(model, enc["x"], enc["y"], 60)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    (d / "buyer.toml").write_text(BUYER)
    return model.eval(), train, sellers


def sellers_toml(d, runtime, extra=""):
    """sellers.toml for ``runtime`` listing the three seller files of :func:`write_table_market`."""
    files = {"csv-clinic": "csv-clinic.csv", "parquet-clinic": "parquet-clinic.parquet",
             "jsonl-clinic": "jsonl-clinic.jsonl"}
    path = d / f"sellers-{runtime}.toml"
    path.write_text(f'runtime = "{runtime}"\n{extra}' + "".join(
        f'[[sellers]]\nid = "{sid}"\ndata = "{f}"\n' for sid, f in files.items()))
    return path


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    d = tmp_path_factory.mktemp("table-buyer")
    model, train, sellers = write_table_market(d)
    sellers_toml(d, "inprocess")
    return d, model, train, sellers


def test_csv_buyer_values_raw_sellers_like_a_pandas_reference(market):
    # Prepare
    d, model, train, sellers = market

    # Execute
    result = tip_fed.value_files(d / "buyer.toml", d / "sellers-inprocess.toml", d / "out")

    # Assert
    prepared = Buyer.from_prepared(prepare_from_config(load_buyer_config(d / "buyer.toml")))
    assert isinstance(prepared.input_format, TableFormat)
    task = get_task("classification")
    rows = {r["seller_id"]: r for r in read_csv(d / "out" / "valuations.csv")}
    assert sorted(rows) == sorted(sellers) and not result.valuation.missing
    for sid, frame in sellers.items():
        g = projected_grads(model, prepared.spec, task, _encode(frame, train)).double()
        plain = float((clip_rows(g, prepared.grad_norm_bound)[0] @ prepared.query).sum())
        tol = len(frame) * 1e-6 * prepared.query_norm * prepared.grad_norm_bound
        assert abs(float(rows[sid]["score"]) - plain) <= tol, (sid, rows[sid]["score"], plain)
        assert int(rows[sid]["n_samples"]) == len(frame)
    manifest = json.loads((d / "out" / "manifest.json").read_text())
    assert manifest["input_format"] == "TableFormat"
    offers = manifest["sessions"][0]["offers"]
    assert set(offers) == set(sellers) and all(o["offer_bytes"] > 0 for o in offers.values())


def test_a_prepared_query_keeps_its_format_and_a_changed_format_is_refused(market, tmp_path):
    d, *_ = market
    cfg = load_buyer_config(d / "buyer.toml")
    prepared = prepare_from_config(cfg)
    prepared.save(tmp_path / "q")
    assert check_prepared(cfg, tip_fed.PreparedQuery.load(tmp_path / "q"), "q").input_format == prepared.input_format
    swapped = BUYER.replace(json.dumps(FEATURES), json.dumps([FEATURES[1], FEATURES[0], *FEATURES[2:]]))
    (d / "other.toml").write_text(swapped)
    with pytest.raises(ConfigError, match=r"another input format \(TableFormat\) than other.toml's \[format\]"):
        check_prepared(load_buyer_config(d / "other.toml"), tip_fed.PreparedQuery.load(tmp_path / "q"), "q")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"worst area"', '"worst aera"'),
     r"format.features names field 'worst aera', which data.objective \(objective.csv\) does not have"),
    (lambda t: t.replace(f'label = "{LABEL}"', 'label = "outcome"'),
     r"format.label names field 'outcome', which data.objective"),
    (lambda t: t.replace('"mean radius", ', "").replace("in_features = 6", "in_features = 5"), None),
])
def test_a_format_not_matching_the_data_is_a_config_error_naming_the_key(market, edit, message):
    d, *_ = market
    (d / "bad.toml").write_text(edit(BUYER))
    cfg = load_buyer_config(d / "bad.toml")
    if message is None:  # a consistent 5-feature buyer is fine, but not with 6-feature weights
        with pytest.raises(tip_fed.TipError, match="do not fit the model"):
            prepare_from_config(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        prepare_from_config(cfg)


def test_label_values_outside_the_given_classes_name_the_format(market):
    d, *_ = market
    with_classes = BUYER.replace(f'label = "{LABEL}"', f'label = "{LABEL}"\nclasses = ["benign", "cancer"]')
    (d / "classes.toml").write_text(with_classes)
    with pytest.raises(ConfigError, match=r"\[format\] cannot encode the buyer's data: .*'malignant'"):
        prepare_from_config(load_buyer_config(d / "classes.toml"))


@pytest.fixture(scope="module")
def text_buyer(tmp_path_factory):
    """A causal LM and its tokenizer saved together with save_pretrained; JSONL and plain-text records."""
    import transformers

    from ..raw_data import docstring_corpus, tiny_gpt2, train_tokenizer, write_jsonl

    d = tmp_path_factory.mktemp("text-buyer")
    texts = docstring_corpus(120)
    tok = train_tokenizer(texts[:60])
    tiny_gpt2(tok.get_vocab_size()).save_pretrained(d / "lm")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", model_max_length=TEXT_LENGTH
    ).save_pretrained(d / "lm")
    write_jsonl(d / "train.jsonl", texts[:40])
    write_jsonl(d / "objective.jsonl", texts[40:55])
    parts = {"notes-a": texts[60:80], "notes-b": texts[80:110]}
    write_jsonl(d / "notes-a.jsonl", parts["notes-a"])
    (d / "notes-b.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in parts["notes-b"]))
    parts["notes-b"] = [t.replace("\n", " ") for t in parts["notes-b"]]
    (d / "buyer.toml").write_text(
        '[model]\ntask = "causal-lm"\npath = "lm"\n[data]\nobjective = "objective.jsonl"\n'
        'train = "train.jsonl"\n[format]\nkind = "text"\n[projection]\nrank = 4\n'
    )
    (d / "sellers.toml").write_text(
        'runtime = "inprocess"\n[[sellers]]\nid = "notes-a"\ndata = "notes-a.jsonl"\n'
        '[[sellers]]\nid = "notes-b"\ndata = "notes-b.txt"\n'
    )
    return d, tok, parts


def test_text_buyer_uses_the_tokenizer_saved_with_its_model(text_buyer):
    """[format] kind = "text" without a tokenizer key takes the [model] path's tokenizer and its
    model_max_length; valuations equal a reference encoded by transformers' own tokenizer."""
    import transformers

    d, _, parts = text_buyer
    result = tip_fed.value_files(d / "buyer.toml", d / "sellers.toml", d / "out")
    prepared = Buyer.from_prepared(prepare_from_config(load_buyer_config(d / "buyer.toml")))
    assert prepared.input_format.max_length == TEXT_LENGTH
    lm = transformers.GPT2LMHeadModel.from_pretrained(d / "lm").eval()
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(d / "lm")
    task = get_task("causal-lm")
    got = result.valuation.by_id()
    assert sorted(got) == sorted(parts)
    for sid, texts in parts.items():
        enc = hf(texts, padding=True, truncation=True, max_length=TEXT_LENGTH, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        g = projected_grads(lm, prepared.spec, task, batch).double()
        plain = float((clip_rows(g, prepared.grad_norm_bound)[0] @ prepared.query).sum())
        assert abs(got[sid].total - plain) <= len(texts) * 1e-6 * prepared.query_norm * prepared.grad_norm_bound


def test_a_text_field_the_records_lack_names_the_key(text_buyer):
    d, *_ = text_buyer
    (d / "body.toml").write_text(
        (d / "buyer.toml").read_text().replace('kind = "text"', 'kind = "text"\ntext-field = "body"')
    )
    with pytest.raises(
        ConfigError,
        match=r"format.text-field names field 'body', which data.objective "
        r"\(objective.jsonl\) does not have",
    ):
        prepare_from_config(load_buyer_config(d / "body.toml"))
