"""``tip-fed seller serve --data corpus.jsonl``: a seller process holding raw text, valued over gRPC.

The process is started on 127.0.0.1 with a free port, valued with ``value_sellers`` and
``Buyer.settle``, and must give the in-process seller's valuation of the same file; the test
stops the process it started, by PID.
"""

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tip_fed.config import PreconditionerConfig, ProjectionConfig, ProtocolConfig
from tip_fed.grpc import SellerEndpoint, value_sellers, wait_until_healthy
from tip_fed.protocol import BuyerSettings, Seller, SellerPolicy
from tip_fed.protocol.records import load_seller_data

from ..raw_data import docstring_corpus, text_buyer, train_tokenizer, write_jsonl

CLI = Path(sys.executable).parent / "tip-fed"
READY = re.compile(r"seller (?P<id>\S+) \((?P<n>\d+) samples\) ready on 127\.0\.0\.1:(?P<port>\d+) \(insecure\)")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait_ready(proc: subprocess.Popen, timeout_s: float) -> re.Match:
    """The seller's 'ready on' line from its stdout (read in a thread, so a silent process cannot hang us)."""
    found: list[re.Match] = []
    lines: list[str] = []

    def read() -> None:  # keeps draining the pipe, so the seller never blocks on a full one
        for line in proc.stdout:
            lines.append(line)
            if not found and (m := READY.search(line)) is not None:
                found.append(m)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while not found and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not found:
        raise AssertionError(f"seller did not start (exit {proc.poll()}): {''.join(lines)[-2000:]}")
    return found[0]


@contextlib.contextmanager
def _serving(data: Path):
    """``tip-fed seller serve --data DATA --insecure --port 0`` until the block ends; stopped by PID."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [str(CLI), "seller", "serve", "--data", str(data), "--insecure", "--port", "0", "--exact-per-sample",
         "--max-exact", "-1", "--total-max-exact", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        yield _wait_ready(proc, 120)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".txt"])
def test_seller_serve_reads_tables_and_plain_text(tmp_path, suffix):
    path = tmp_path / f"site-7{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(docstring_corpus(30)) + "\n", encoding="utf-8")
    else:
        frame = pd.DataFrame({"age": range(30), "label": ["a", "b"] * 15})
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    with _serving(path) as ready:
        assert ready["id"] == "site-7" and int(ready["n"]) == 30
        health = wait_until_healthy(SellerEndpoint("site-7", f"127.0.0.1:{ready['port']}"), tls=None, insecure=True,
                                    timeout_s=30)
        assert health.n_samples == 30


def test_seller_serve_jsonl_matches_the_in_process_seller(tmp_path):
    texts = docstring_corpus(100)
    settings = BuyerSettings(projection=ProjectionConfig(rank=4), preconditioner=PreconditionerConfig(kind="kfac"),
                             protocol=ProtocolConfig(disclosure="per-sample"))
    buyer = text_buyer(texts[:25], train_tokenizer(texts[:50]), settings, 24, train=texts[:50])
    data = tmp_path / "docs-corpus.jsonl"
    write_jsonl(data, texts[50:100])

    with _serving(data) as ready:
        assert ready["id"] == "docs-corpus" and int(ready["n"]) == 50  # seller id = the file stem
        endpoint = SellerEndpoint("docs-corpus", f"127.0.0.1:{ready['port']}")
        wait_until_healthy(endpoint, tls=None, insecure=True, timeout_s=30)
        replies, failures = value_sellers([endpoint], buyer.offer(max_samples=100), insecure=True, timeout_s=120)
        assert failures == {}
        remote = buyer.settle(list(replies.values()), expected=["docs-corpus"])
    assert remote.rejected == {} and remote.missing == []

    local = buyer.settle([Seller("docs-corpus", load_seller_data(data), policy=SellerPolicy(exact_per_sample=True))
                          .respond(buyer.offer(max_samples=100))])
    r, here = remote.sellers[0], local.sellers[0]
    tol = 2e-6 * buyer.query_norm * buyer.grad_norm_bound  # two independent CKKS + sanitising noises
    assert r.n_samples == here.n_samples == 50
    assert np.max(np.abs(r.per_sample - here.per_sample)) <= tol
    assert abs(r.total - here.total) <= 50 * tol
    assert np.std(here.per_sample) > 100 * tol  # the scores differ between records: the comparison has teeth
