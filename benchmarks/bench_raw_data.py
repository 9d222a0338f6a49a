"""Raw-data sellers: what reading and encoding records costs a seller, and what the format adds to an Offer.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_raw_data.py --out benchmarks/results/raw-data.json

Table: breast-cancer rows (resampled) in a CSV; text: standard-library docstrings in a JSONL file,
tokenized by a locally trained ByteLevel BPE. Reported per record (medians of 3 runs), plus one
seller's first and repeated answer to the same buyer (the repeat reuses the encoded tensors).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from tip_fed.bench.common import bench_args, machine, versions, write_result
from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.protocol import BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.ledger import LedgerPolicy
from tip_fed.protocol.records import read_records
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

# the record builders the tests use (real data shipped offline); a plain file, not an installed package
_spec = importlib.util.spec_from_file_location(
    "raw_data", Path(__file__).resolve().parents[1] / "tests" / "raw_data.py"
)
raw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raw)

SETTINGS = BuyerSettings(
    projection=ProjectionConfig(rank=4),
    preconditioner=PreconditionerConfig(kind="identity"),
    protocol=ProtocolConfig(disclosure="aggregate"),
)


def _median_s(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _seller(buyer, records, n: int) -> dict:
    seller = Seller("bench", records, policy=SellerPolicy(lifetime=LedgerPolicy(max_exact=None)))
    first = _median_s(lambda: seller.respond(buyer.offer(max_samples=n)), 1)
    repeat = _median_s(lambda: seller.respond(buyer.offer(max_samples=n)), 1)
    offer = pb.Offer.FromString(buyer.offer(max_samples=n))
    return {
        "respond_first_s": first,
        "respond_repeat_s": repeat,
        "offer_bytes": offer.ByteSize(),
        "input_format_bytes": offer.input.ByteSize(),
    }


def run(tmp: Path, n_table: int, n_text: int, max_length: int) -> dict:
    frame = raw.cancer_table()
    table = frame.sample(n=n_table, replace=True, random_state=1)
    table.to_csv(tmp / "t.csv", index=False)
    buyer = raw.table_buyer(frame.iloc[:200], SETTINGS)
    rows = read_records(tmp / "t.csv")
    out = {
        "table": {
            "records": n_table,
            "read_us_per_record": 1e6 * _median_s(lambda: read_records(tmp / "t.csv")) / n_table,
            "encode_us_per_record": 1e6 * _median_s(lambda: buyer.input_format.encode(rows)) / n_table,
            **_seller(buyer, rows, n_table),
        }
    }
    texts = raw.docstring_corpus(200)
    tok = raw.train_tokenizer(texts, vocab_size=2000)
    raw.write_jsonl(tmp / "c.jsonl", [texts[i % len(texts)] for i in range(n_text)])
    buyer = raw.text_buyer(texts[:40], tok, SETTINGS, max_length)
    recs = read_records(tmp / "c.jsonl")
    out["text"] = {
        "records": n_text,
        "max_length": max_length,
        "vocab": tok.get_vocab_size(),
        "read_us_per_record": 1e6 * _median_s(lambda: read_records(tmp / "c.jsonl")) / n_text,
        "encode_us_per_record": 1e6 * _median_s(lambda: buyer.input_format.encode(recs)) / n_text,
        **_seller(buyer, recs, n_text),
    }
    for part in out.values():  # what encoding adds to a whole answer (gradients and HE dominate)
        part["encode_share_of_respond"] = (
            part["encode_us_per_record"] * part["records"] / 1e6 / part["respond_repeat_s"]
        )
    return out


def main() -> None:
    args = bench_args(__doc__, "small sizes (a smoke run)")
    sizes = (500, 200, 32) if args.quick else (5000, 1000, 64)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"quick": args.quick, "machine": machine(), "versions": versions(), "raw_data": run(Path(tmp), *sizes)}
    write_result(result, args.out, "raw_data")


if __name__ == "__main__":
    main()
