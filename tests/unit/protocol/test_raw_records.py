"""Seller data files (CSV, Parquet, JSONL, text, safetensors) and the input formats that encode them."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from tip_fed.errors import DataError, ProtocolError
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.formats import (
    MAX_FEATURES,
    TableFormat,
    TextFormat,
    check_input_pb,
    encode_records,
    format_from_pb,
    label_text,
)
from tip_fed.protocol.records import RawRecords, load_seller_data, read_records

from ...raw_data import FEATURES, LABEL, cancer_table, docstring_corpus, train_tokenizer

# -- readers -------------------------------------------------------------------------------------


def test_csv_and_parquet_give_the_same_encoded_table(tmp_path):
    frame = cancer_table().iloc[:50]
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    csv_rows, pq_rows = load_seller_data(tmp_path / "a.csv"), load_seller_data(tmp_path / "a.parquet")
    assert isinstance(csv_rows, RawRecords) and len(csv_rows) == len(pq_rows) == 50
    assert isinstance(csv_rows.rows[0][FEATURES[0]], str)  # CSV cells stay text until a format reads them
    assert isinstance(pq_rows.rows[0][FEATURES[0]], float)
    fmt = TableFormat.fit(pq_rows, FEATURES, LABEL)
    a, b = fmt.encode(csv_rows), fmt.encode(pq_rows)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    # the standardisation is the buyer's population mean and std, as numpy computes them
    x = frame[FEATURES].to_numpy()
    np.testing.assert_allclose(fmt.offset, x.mean(0))
    np.testing.assert_allclose(fmt.scale, x.std(0))
    np.testing.assert_allclose(a["x"].numpy(), ((x - x.mean(0)) / x.std(0)).astype(np.float32), rtol=1e-6)
    assert a["x"].dtype == torch.float32 and a["y"].dtype == torch.long
    assert a["y"].tolist() == [fmt.classes.index(v) for v in frame[LABEL]]


def test_jsonl_txt_and_safetensors(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "label": 1}\n', encoding="utf-8")
    assert [r["text"] for r in read_records(tmp_path / "c.jsonl").rows] == ["one", "two"]
    (tmp_path / "c.txt").write_text("first line\n\n  \nsecond line\r\nthird\n", encoding="utf-8")
    # one record per non-empty line
    assert [r["text"] for r in read_records(tmp_path / "c.txt").rows] == ["first line", "second line", "third"]
    save_dataset({"x": torch.ones(3, 2), "y": torch.zeros(3, dtype=torch.long)}, tmp_path / "t.safetensors")
    tensors = load_seller_data(tmp_path / "t.safetensors")
    assert not isinstance(tensors, RawRecords) and tensors["x"].shape == (3, 2)
    assert encode_records(None, tensors) is tensors  # tensor datasets pass through


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n', r"bad.jsonl, line 2: malformed JSON"),
    ("list.jsonl", '{"text": "ok"}\n[1, 2]\n', r"line 2: a JSON list, not an object"),
    ("empty.csv", "", "is empty: a CSV needs a header row"),
    ("header.csv", "a,b\n", "holds no records"),
    ("ragged.csv", "a,b\n1,2\n3\n", r"ragged.csv, line 3: 1 values for 2 columns"),
    ("blank.txt", "\n  \n", "holds no records"),
    ("data.xlsx", "x", r"extension '.xlsx'; seller data must be one of .safetensors, .csv, .parquet"),
    ("broken.parquet", "not parquet", "not a readable Parquet file"),
])
def test_bad_files_are_data_errors_that_say_what_to_fix(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_seller_data(tmp_path / name)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_seller_data(tmp_path / "nope.csv")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text .* save it as UTF-8"):
        load_seller_data(tmp_path / "latin.txt")



@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_a_seller_loads_only_the_fields_it_sells(tmp_path, suffix):
    frame = pd.DataFrame({"age": [30, 40], "bmi": [22.5, 31.0], "hiv_status": [0, 1], "ssn": ["1-2-3", "4-5-6"]})
    path = tmp_path / f"clinic{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    records = load_seller_data(path, fields=["age", " bmi", "age"])  # spaces of "a, b" and repeats are ignored
    assert records.fields == {"age", "bmi"} and [set(r) for r in records.rows] == [{"age", "bmi"}] * 2
    assert [float(r["bmi"]) for r in records.rows] == [22.5, 31.0]
    assert load_seller_data(path).fields == set(frame.columns)  # no list: every field of the file
    with pytest.raises(DataError, match=r"has no field 'weight' in every record .* fix the list of fields"):
        load_seller_data(path, fields=["age", "weight"])
    with pytest.raises(DataError, match=r"the list of fields to offer .* is empty"):
        load_seller_data(path, fields=[" ", ""])


def test_a_list_of_fields_does_not_apply_to_tensors(tmp_path):
    save_dataset({"x": torch.zeros(2, 3), "y": torch.zeros(2, dtype=torch.long)}, tmp_path / "t.safetensors")
    with pytest.raises(DataError, match="applies only to raw records"):
        load_seller_data(tmp_path / "t.safetensors", fields=["x"])


# -- table format ----------------------------------------------------------------------------------


def _rows(**columns):
    n = len(next(iter(columns.values())))
    return RawRecords.from_rows([{k: v[i] for k, v in columns.items()} for i in range(n)], "seller.csv")


def test_table_format_errors_name_the_column_and_the_record():
    fmt = TableFormat(("age", "bmi"), "outcome", ("no", "yes"), (50.0, 25.0), (10.0, 5.0))
    with pytest.raises(DataError, match=r"no feature column 'bmi' \(it has 'age', 'outcome'\)"):
        fmt.encode(_rows(age=["1"], outcome=["no"]))
    with pytest.raises(DataError, match=r"column 'bmi' holds non-numeric value 'n/a' in record 2"):
        fmt.encode(_rows(age=["1", "2"], bmi=["3", "n/a"], outcome=["no", "no"]))
    with pytest.raises(DataError, match=r"column 'age' holds non-numeric value '' in record 1; .* fill or drop"):
        fmt.encode(_rows(age=[""], bmi=["3"], outcome=["no"]))
    with pytest.raises(DataError, match=r"column 'age' holds nan"):
        fmt.encode(_rows(age=[float("nan")], bmi=[3.0], outcome=["no"]))
    with pytest.raises(DataError, match=r"record 1 of seller.csv has label 'maybe' .* not one of the buyer's classes"):
        fmt.encode(_rows(age=["1"], bmi=["3"], outcome=["maybe"]))
    enc = fmt.encode(_rows(age=["60", 40], bmi=[30.0, "20"], outcome=["yes", " no "]))
    assert enc["x"].tolist() == [[1.0, 1.0], [-1.0, -1.0]] and enc["y"].tolist() == [1, 0]


def test_labels_match_across_file_types_and_regression():
    assert label_text(1) == label_text(1.0) == label_text("1") == label_text(np.int64(1)) == "1"
    assert label_text(True) == "true" and label_text(0.5) == "0.5"
    rows = _rows(a=[1.0, 2.0, 3.0, 4.0], y=[0, 1.0, "1", 10])
    fmt = TableFormat.fit(rows, ["a"], "y")
    assert fmt.classes == ("0", "1", "10")  # numeric order, not text order
    assert fmt.encode(rows)["y"].tolist() == [0, 1, 1, 2]
    reg = TableFormat.fit(rows, ["a"], "y", regression=True)
    assert reg.classes is None and reg.encode(rows)["y"].tolist() == [0.0, 1.0, 1.0, 10.0]
    const = TableFormat.fit(_rows(a=[2.0, 2.0], y=[0, 1]), ["a"], "y")
    assert const.scale == (1.0,)  # a constant feature is centred, not divided by zero


def test_formats_round_trip_through_the_wire():
    table = TableFormat(("a", "b"), "y", ("n", "p"), (0.5, -1.0), (2.0, 3.0), features_key="features",
                        label_key="target", dtype="float64")
    assert format_from_pb(table.to_pb()) == table
    assert table.encode(_rows(a=[1.5], b=[2.0], y=["p"]))["features"].dtype == torch.float64
    text = TextFormat('{"not": "parsed yet"}', 128, text_field="body", label_field="stars", classes=("1", "5"),
                      pad_id=3, add_special_tokens=False)
    assert format_from_pb(text.to_pb()) == text


def test_format_constructors_refuse_what_sellers_would_refuse():
    with pytest.raises(ProtocolError, match="2 features but 1 offsets and 2 scales"):
        TableFormat(("a", "b"), "y", None, (0.0,), (1.0, 1.0))
    with pytest.raises(ProtocolError, match="zero scale"):
        TableFormat(("a",), "y", None, (0.0,), (0.0,))
    with pytest.raises(ProtocolError, match="max_length 0 is outside"):
        TextFormat("{}", 0)
    check_input_pb(TableFormat(tuple(f"c{i}" for i in range(MAX_FEATURES)), "y", None, (0.0,) * MAX_FEATURES,
                               (1.0,) * MAX_FEATURES).to_pb())


# -- text format -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(docstring_corpus(80))


def test_text_format_matches_transformers_tokenization_with_labels(tokenizer):
    texts = docstring_corpus(80)[:12]
    stars = [str(1 + i % 3) for i in range(12)]
    fmt = TextFormat.from_tokenizer(tokenizer, 16, label_field="stars", classes=("1", "2", "3"),
                                    pad_id=tokenizer.token_to_id("<|pad|>"))
    batch = fmt.encode(RawRecords.from_rows([{"text": t, "stars": s} for t, s in zip(texts, stars, strict=True)]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>")
    ref = hf(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert batch["labels"].tolist() == [int(s) - 1 for s in stars]
    short = fmt.encode(RawRecords.from_rows([{"text": "a b", "stars": 1}, {"text": "abc", "stars": 3.0}]))
    assert short["input_ids"].shape == (2, 16)  # padded to max_length: no width depends on a record's length


def test_text_records_that_cannot_be_encoded(tokenizer):
    fmt = TextFormat.from_tokenizer(tokenizer, 16)
    with pytest.raises(DataError, match=r"record 2 of the records has an empty text in field 'text'"):
        fmt.encode(RawRecords.from_rows([{"text": "fine"}, {"text": "  "}]))
    with pytest.raises(DataError, match=r"has no text column 'text' \(it has 'body'\)"):
        fmt.encode(RawRecords.from_rows([{"body": "fine"}]))
    with pytest.raises(DataError, match=r"record 1 .* has no text"):
        fmt.encode(RawRecords.from_rows([{"text": 5}]))
    with pytest.raises(DataError, match="raw records; give an input format"):
        encode_records(None, RawRecords.from_rows([{"text": "x"}]))


def test_jsonl_fields_survive_the_reader(tmp_path, tokenizer):
    rows = [{"text": "Return the value.", "meta": {"k": [1, 2]}}, {"text": "ünïcode text"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    records = read_records(tmp_path / "r.jsonl")
    assert records.rows[1]["text"] == "ünïcode text" and records.rows[0]["meta"] == {"k": [1, 2]}
    assert TextFormat.from_tokenizer(tokenizer, 8).encode(records)["input_ids"].shape[0] == 2


def test_pandas_frames_become_records():
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": ["u", "v"]})
    assert RawRecords.from_rows(frame.to_dict("records")).column("y") == ["u", "v"]


def test_text_format_from_a_saved_tokenizer(tmp_path, tokenizer):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>",
                                              eos_token="<|endoftext|>", model_max_length=40)
    hf.save_pretrained(tmp_path / "tok")
    fmt = TextFormat.from_pretrained(tmp_path / "tok")
    assert fmt.max_length == 40 and fmt.pad_id == tokenizer.token_to_id("<|pad|>")
    texts = docstring_corpus(80)[20:25]
    ref = hf(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
    assert torch.equal(fmt.encode(RawRecords.from_rows([{"text": t} for t in texts]))["input_ids"], ref["input_ids"])
    bare = TextFormat.from_pretrained(tmp_path / "tok" / "tokenizer.json", 8)
    assert bare.max_length == 8
    with pytest.raises(DataError, match="pass max_length"):
        TextFormat.from_pretrained(tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(DataError, match=r"holds no tokenizer\.json"):
        TextFormat.from_pretrained(tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json: .* not a valid tokenizers serialization"):
        TextFormat.from_pretrained(tmp_path / "bad.json", 8)


def test_formats_built_from_config_lists_compare_by_value():
    a = TableFormat(["a"], "y", [0, 1], [0.0], [1.0])
    b = TableFormat(("a",), "y", ("0", "1"), (0.0,), (1.0,))
    assert a == b and hash(a) == hash(b)
