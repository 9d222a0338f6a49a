"""The Flower ClientApp reads raw seller files (``data-path`` = .csv, .parquet, .jsonl, .txt).

The ClientApp is called as a SuperNode calls it (a Context per node, the Offer in a Message); its
decrypted answers must equal those of in-process sellers holding the same files.
"""

import numpy as np
from flwr.app import Context, Message, RecordDict

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.flower import records
from tip_fed.flower.client_app import make_client_app
from tip_fed.protocol import BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.records import load_seller_data
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from ..raw_data import cancer_table, docstring_corpus, table_buyer, text_buyer, train_tokenizer, write_jsonl
from .test_flower_apps import task_identity  # noqa: F401 - autouse: Messages need a task identity

SETTINGS = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="identity"),
                         protocol=ProtocolConfig(disclosure="per-sample"))


def _value_through_client_app(buyer, paths):
    """Each file served by a ClientApp node and by an in-process Seller; both valuations."""
    app = make_client_app()
    offer = buyer.offer(max_samples=100)
    replies = []
    for node, path in enumerate(paths.values(), start=1):
        ctx = Context(run_id=1, node_id=node, node_config={"data-path": str(path), "exact-per-sample": True},
                      state=RecordDict(), run_config={})
        out = app(Message(content=records.encode_offer(offer), dst_node_id=node, message_type=records.QUERY_TYPE), ctx)
        reply, seller_id, error = records.decode_reply(out.content)
        assert error is None and seller_id == path.stem
        replies.append(reply)
    flower = buyer.settle(replies).by_id()
    offer = buyer.offer(max_samples=100)
    local = buyer.settle([Seller(sid, load_seller_data(p), policy=SellerPolicy(exact_per_sample=True)).respond(offer)
                          for sid, p in paths.items()]).by_id()
    tol = 2e-6 * buyer.query_norm * buyer.grad_norm_bound
    assert sorted(flower) == sorted(local) == sorted(paths)
    for sid in paths:
        assert np.max(np.abs(flower[sid].per_sample - local[sid].per_sample)) <= tol
        assert abs(flower[sid].total - local[sid].total) <= local[sid].n_samples * tol


def test_client_app_serves_csv_and_parquet_tables(tmp_path):
    frame = cancer_table()
    buyer = table_buyer(frame.iloc[:150], SETTINGS)
    paths = {"ward-a": tmp_path / "ward-a.csv", "ward-b": tmp_path / "ward-b.parquet"}
    frame.iloc[150:190].to_csv(paths["ward-a"], index=False)
    frame.iloc[190:240].to_parquet(paths["ward-b"])
    _value_through_client_app(buyer, paths)


def test_client_app_serves_jsonl_and_plain_text(tmp_path):
    texts = docstring_corpus(90)
    buyer = text_buyer(texts[:20], train_tokenizer(texts[:40]), SETTINGS, 20)
    paths = {"notes": tmp_path / "notes.jsonl", "lines": tmp_path / "lines.txt"}
    write_jsonl(paths["notes"], texts[40:60])
    paths["lines"].write_text("\n\n".join(texts[60:90]) + "\n", encoding="utf-8")
    assert len(load_seller_data(paths["lines"])) == 30  # one record per non-empty line
    _value_through_client_app(buyer, paths)


def test_client_app_sells_only_the_fields_of_its_node_config(tmp_path):
    """``fields=...`` in the node config: a format reading another column of the file is refused
    with an error reply that names no other field; the sold columns are valued as before."""
    frame = cancer_table()
    buyer = table_buyer(frame.iloc[:150], SETTINGS)
    path = tmp_path / "ward-a.csv"
    sellers_rows = frame.iloc[150:190].copy()
    sellers_rows["hiv_status"] = (np.arange(len(sellers_rows)) % 2).astype(str)
    sellers_rows.to_csv(path, index=False)
    sold = ",".join([*buyer.input_format.features, buyer.input_format.label])
    app = make_client_app()

    def ask(offer: bytes, node_config: dict) -> tuple:
        config = {"data-path": str(path), "exact-per-sample": True, "max-exact": -1, **node_config}
        ctx = Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})
        out = app(Message(content=records.encode_offer(offer), dst_node_id=1, message_type=records.QUERY_TYPE), ctx)
        return records.decode_reply(out.content)

    hostile = pb.Offer.FromString(buyer.offer(max_samples=100))
    hostile.input.table.label = "hiv_status"
    del hostile.input.table.classes[:]
    hostile.input.table.classes.extend(["0", "1"])
    reply, _, error = ask(hostile.SerializeToString(), {"fields": sold})
    assert reply is None and "ward-a.csv offers no field 'hiv_status'" in error
    assert not [f for f in sold.split(",") if f in error]
    assert ask(hostile.SerializeToString(), {})[2] is None  # without the list, the file's every column is sold
    reply, _, error = ask(buyer.offer(max_samples=100), {"fields": sold})
    assert error is None and buyer.settle([reply]).rejected == {}
    _, _, error = ask(buyer.offer(max_samples=100), {"fields": 3})
    assert "node config 'fields' must be comma-separated field names" in error
