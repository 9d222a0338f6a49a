"""Offer bytes and seller time, first session vs a repeat session, with the seller's model cache.

    .venv/bin/python benchmarks/bench_offer_cache.py --out benchmarks/results/offer-cache.json [--quick]

A GPT-2-small-size causal LM (``GPT2LMHeadModel(GPT2Config())``, 124M parameters, random init from
its config, nothing downloaded; ``--quick``: a 2-layer, width-128 GPT-2) is valued twice by one
real ``tip-fed seller serve`` process on 127.0.0.1 (plaintext gRPC, ``--model-cache-mb``), holding
8 records of 64 tokens. Both sessions go through :func:`tip_fed.grpc.value_sellers` by reference:
the first seller call carries no weights, the seller answers model-not-held, the full Offer follows;
the second session's reference is answered from the cache. Figures per session: Value request bytes
sent (every call), whether the weights went out, the seller's own timings from its Reply
(``total_s`` from receiving the Offer to the Reply, model decoding and fingerprint checks included;
``he_share = encrypted_s / total_s``), seconds per record, and the buyer's round-trip wall time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from tip_fed.bench.common import bench_args, machine, versions, write_result
from tip_fed.config import ProjectionConfig, ProtocolConfig
from tip_fed.core.tasks import get_task
from tip_fed.grpc import OfferSent, SellerEndpoint, value_sellers
from tip_fed.protocol import Buyer, BuyerSettings
from tip_fed.protocol.data import save_dataset
from tip_fed.protocol.model_cache import strip_weights
from tip_fed.protocol.reply import decode_reply

RECORDS, TOKENS = 8, 64
MAX_MESSAGE_MB = 2047  # a 124M GPT-2 Offer is ~650 MB, above the 512 MiB default


def _model(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    small = ({"n_layer": 2, "n_embd": 128, "n_head": 2, "vocab_size": 1000, "n_positions": 128, "bos_token_id": 0,
              "eos_token_id": 0} if quick else {})
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**small)).eval()


def _tokens(n: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, TOKENS), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _start_seller(data: Path, cache_mb: int, log: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "tip_fed.cli", "seller", "serve", "--data", str(data), "--port", "0", "--insecure",
           "--exact-per-sample", "--max-exact", "-1", "--total-max-exact", "-1", "--model-cache-mb", str(cache_mb),
           "--offer-memory-mb", "16384", "--in-flight-memory-mb", "32768", "--offer-work-s", "36000",
           "--max-message-mb", str(MAX_MESSAGE_MB)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"ready on (127\.0\.0\.1:\d+) ", line)
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the seller did not start: {line!r}; see {log}")
    return proc, match.group(1)


def run(quick: bool) -> dict[str, Any]:
    """Two sessions of one buyer against one seller process; see the module docstring."""
    model = _model(quick)
    vocab = model.config.vocab_size
    settings = BuyerSettings(projection=ProjectionConfig(rank=8, include=("transformer.h.*",)),
                             protocol=ProtocolConfig(disclosure="per-sample"), batch_size=4)
    t0 = time.perf_counter()
    buyer = Buyer(model, get_task("causal-lm"), objective=_tokens(4, vocab, 1), train=_tokens(8, vocab, 2),
                  settings=settings)
    prepare_s = time.perf_counter() - t0
    sessions: list[dict[str, Any]] = []
    totals = []
    with tempfile.TemporaryDirectory(prefix="tip-offer-cache-") as tmp:
        data = save_dataset(_tokens(RECORDS, vocab, 3), Path(tmp) / "bench-seller.safetensors")
        proc, address = _start_seller(data, 4096, Path(tmp) / "seller.log")
        endpoint = [SellerEndpoint("bench-seller", address)]
        try:
            for _ in range(2):
                offer = buyer.offer(max_samples=RECORDS)
                sent: dict[str, OfferSent] = {}
                t = time.perf_counter()
                replies, failures = value_sellers(endpoint, offer, insecure=True, timeout_s=3600, retries=0,
                                                  max_message_bytes=MAX_MESSAGE_MB << 20, sent=sent)
                wall = time.perf_counter() - t
                if failures:
                    raise RuntimeError(f"the seller refused: {failures}")
                reply = decode_reply(replies["bench-seller"])
                totals.append(buyer.settle(list(replies.values()), expected=["bench-seller"]).sellers[0].total)
                tm = reply.timings
                sessions.append({
                    "offer_bytes": len(offer), "reference_offer_bytes": len(strip_weights(offer)),
                    "bytes_sent": sent["bench-seller"].offer_bytes,
                    "weights_shipped": sent["bench-seller"].weights_shipped,
                    "buyer_wall_s": wall, "seller_total_s": tm.total_s, "seller_gradients_s": tm.gradients_s,
                    "seller_commit_s": tm.commit_s, "seller_encrypted_s": tm.encrypted_s,
                    "seller_s_per_record": tm.total_s / reply.n_samples, "he_share": tm.encrypted_s / tm.total_s,
                })
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    first, repeat = sessions
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"GPT2LMHeadModel {n_params / 1e6:.1f}M parameters (random init from config)",
        "carrier": "grpc, one `tip-fed seller serve` process on 127.0.0.1, plaintext",
        "records": RECORDS, "tokens_per_record": TOKENS, "dim": buyer.spec.dim, "buyer_prepare_s": prepare_s,
        "torch_threads": torch.get_num_threads(),
        "first": first, "repeat": repeat,
        "bytes_ratio_repeat_to_first": repeat["bytes_sent"] / first["bytes_sent"],
        "total_rel_diff": abs(totals[1] - totals[0]) / max(abs(totals[0]), 1e-12),
    }


def main() -> None:
    args = bench_args(__doc__, "a 2-layer width-128 GPT-2 instead of GPT-2 small")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "machine": machine(), "versions": versions(),
                              "offer_cache": run(args.quick)}
    oc = result["offer_cache"]
    result["summary"] = {
        "offer_mb_first": oc["first"]["bytes_sent"] / 1e6, "offer_mb_repeat": oc["repeat"]["bytes_sent"] / 1e6,
        "seller_s_per_record_first": oc["first"]["seller_s_per_record"],
        "seller_s_per_record_repeat": oc["repeat"]["seller_s_per_record"],
        "he_share_first": oc["first"]["he_share"], "he_share_repeat": oc["repeat"]["he_share"],
    }
    result["seconds"] = time.perf_counter() - t0
    write_result(result, args.out, "summary")


if __name__ == "__main__":
    main()
