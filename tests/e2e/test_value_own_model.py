"""A buyer values sellers for its own language model, as a new user would: no simulation code.

The buyer has a small Llama-architecture causal LM (built from ``transformers.LlamaConfig``,
trained briefly here) and a byte-level BPE tokenizer trained here with the ``tokenizers`` library,
both saved with ``save_pretrained`` into one directory; its objective and training text are JSONL
files. Three sellers hold JSONL text (paragraphs of CPython's own documentation,
``pydoc_data.topics``: the statements the buyer cares about, string methods, and the statements
with their words scrambled) and each runs ``tip-fed seller serve`` with mutual TLS
(``tip-fed tls init``). The buyer runs ``tip-fed buyer prepare`` then ``tip-fed value``.

Checked: every decrypted seller total matches a plaintext reference computed here independently
(transformers' ``PreTrainedTokenizerFast`` and ``LlamaForCausalLM.from_pretrained``, the saved
query, the sellers' projected and clipped gradients) within CKKS tolerance; valuing the same
sellers again ships no weights (the results manifest's per-seller record and the Offer bytes);
the same model and data valued through a local Flower deployment (``runtime =
"flower-deployment"``, seller data files) give the same valuations. Every process a test starts
is stopped by PID.
"""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

import numpy as np
import pytest
import torch
import transformers

from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.protocol import PreparedQuery

from .serving import stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]
TIP_FED = str(Path(sys.executable).parent / "tip-fed")
MAX_LENGTH = 48
SELLERS = ("statements", "strings", "scrambled")
#: pydoc topics per theme: the buyer's objective is about statements
STATEMENTS = ("for", "while", "if", "try", "with", "break", "continue", "return", "raise", "assert", "pass", "del",
              "global", "nonlocal", "import", "compound")
STRINGS = ("string-methods", "strings", "formatstrings")
NUMBERS = ("numbers", "integers", "floating", "numeric-types", "typesseq", "typesmapping", "comparisons", "binary",
           "bitwise", "shifting", "power", "unary")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0")


def _tip_fed(*args, cwd):
    return subprocess.run([TIP_FED, *args], check=False, cwd=cwd, capture_output=True, text=True, env=_env(),
                          timeout=900)


def _paragraphs(topics):
    """Prose paragraphs (no code blocks) of CPython's pydoc topics, whitespace collapsed."""
    out = []
    for key in topics:
        for block in pydoc_topics[key].split("\n\n"):
            text = " ".join(block.split())
            if 60 <= len(text) <= 500 and not any(line.startswith("   ") for line in block.splitlines()):
                out.append(text)
    return out


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def _tokenizer(texts):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", model_max_length=MAX_LENGTH)


def _llama(tokenizer, texts, steps=30):
    """A 2-layer, 32-wide LlamaForCausalLM built from its config and trained ``steps`` Adam steps."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    batch = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(texts), (32,), generator=g)
        loss = model(input_ids=batch["input_ids"][i], attention_mask=batch["attention_mask"][i], labels=labels[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The buyer's directory (model/, train.jsonl, objective.jsonl, buyer.toml), sellers' JSONL and TLS files."""
    root = tmp_path_factory.mktemp("own-model")
    statements = _paragraphs(STATEMENTS)
    general = _paragraphs(sorted(set(pydoc_topics) - set(STATEMENTS) - set(STRINGS) - set(NUMBERS)))
    train = general[:120]
    tokenizer = _tokenizer(general + statements[:40])
    model = _llama(tokenizer, train)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "objective.jsonl", statements[:16])
    rng = random.Random(0)  # noqa: S311 - shuffles test text, nothing secret
    scrambled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in statements[70:100]]
    sellers = {"statements": statements[40:70], "strings": _paragraphs(STRINGS)[:24], "scrambled": scrambled}
    (root / "sellers").mkdir()
    for sid, texts in sellers.items():
        _write_jsonl(root / "sellers" / f"{sid}.jsonl", texts)
    (root / "buyer.toml").write_text(
        'seed = 3\n'
        '[model]\ntask = "causal-lm"\npath = "model"\n'
        '[data]\nobjective = "objective.jsonl"\ntrain = "train.jsonl"\n'
        f'[format]\nkind = "text"\nmax-length = {MAX_LENGTH}\n'
        '[projection]\nrank = 4\n[preconditioner]\nkind = "kfac"\n'
    )
    tls = _tip_fed("tls", "init", "tls", cwd=root)
    assert tls.returncode == 0, tls.stderr
    return root


@pytest.fixture(scope="module")
def seller_services(workspace):
    """``tip-fed seller serve --data sellers/X.jsonl`` with mutual TLS on free ports; stopped by PID after."""
    procs, ports, logs = {}, {}, {}
    try:
        for sid in SELLERS:
            logs[sid] = []
            procs[sid] = subprocess.Popen(
                [TIP_FED, "seller", "serve", "--data", f"sellers/{sid}.jsonl", "--port", "0",
                 "--tls-cert", "tls/seller.crt", "--tls-key", "tls/seller.key", "--tls-client-ca", "tls/ca.crt",
                 "--max-exact", "2"],  # this buyer values them twice, without noise
                cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for sid, proc in procs.items():
            ready = wait_ready(proc, logs[sid], 180)
            assert ready["id"] == sid
            ports[sid] = int(ready["port"])
        yield ports
    finally:
        for proc in procs.values():
            stop(proc)


def _valuations(out):
    with (out / "valuations.csv").open() as fh:
        return {r["seller_id"]: r for r in csv.DictReader(fh)}


def _plaintext(workspace, prepared):
    """Seller totals from both sides' data, encoded independently: transformers' tokenizer and model."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(workspace / "model"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(workspace / "model")).eval()
    task = get_task("causal-lm")
    out = {}
    for sid in SELLERS:
        texts = [json.loads(line)["text"] for line in (workspace / "sellers" / f"{sid}.jsonl").open(encoding="utf-8")]
        enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding="longest", return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        g = projected_grads(model, prepared.spec, task, batch).double()
        out[sid] = (clip_rows(g, prepared.grad_norm_bound)[0] @ prepared.query).numpy()
    return out


def _check(valuations, plain, prepared):
    tol = 1e-6 * prepared.query_norm * prepared.grad_norm_bound  # CKKS + sanitising noise per sample
    assert set(valuations) == set(plain)
    for sid, scores in plain.items():
        assert int(valuations[sid]["n_samples"]) == len(scores)
        assert abs(float(valuations[sid]["score"]) - scores.sum()) <= len(scores) * tol, sid
    totals = sorted(s.sum() for s in plain.values())
    assert min(np.diff(totals)) > 100 * len(plain) * tol  # the sellers differ: the check above has teeth


def _grpc_sellers_toml(path, ports):
    path.write_text('runtime = "grpc"\n[tls]\nca = "tls/ca.crt"\ncert = "tls/buyer.crt"\nkey = "tls/buyer.key"\n'
                    + "".join(f'[[sellers]]\nid = "{sid}"\nendpoint = "127.0.0.1:{port}"\n'
                              for sid, port in ports.items()))


def test_own_llama_valued_over_grpc_then_again_without_weights(workspace, seller_services):
    # Prepare
    _grpc_sellers_toml(workspace / "sellers.toml", seller_services)
    prep = _tip_fed("buyer", "prepare", "buyer.toml", "--out", "query", cwd=workspace)
    assert prep.returncode == 0, prep.stderr
    prepared = PreparedQuery.load(workspace / "query")
    plain = _plaintext(workspace, prepared)

    # Execute
    first = _tip_fed("value", "buyer.toml", "--sellers", "sellers.toml", "--prepared", "query", "--out", "r1",
                     cwd=workspace)
    second = _tip_fed("value", "buyer.toml", "--sellers", "sellers.toml", "--prepared", "query", "--out", "r2",
                      cwd=workspace)

    # Assert
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    _check(_valuations(workspace / "r1"), plain, prepared)
    _check(_valuations(workspace / "r2"), plain, prepared)
    manifests = [json.loads((workspace / r / "manifest.json").read_text())["sessions"][0] for r in ("r1", "r2")]
    assert all(m["valuation"]["model_fingerprint"] == prepared.model_fingerprint for m in manifests)
    sent1, sent2 = (m["offers"] for m in manifests)  # per seller: offer_bytes, weights_shipped
    assert set(sent1) == set(sent2) == set(SELLERS)
    weights = (workspace / "model" / "model.safetensors").stat().st_size
    for sid in SELLERS:
        assert sent1[sid]["weights_shipped"] is True  # a seller's first Offer from this buyer carries the model
        assert sent2[sid]["weights_shipped"] is False  # the seller holds it now: the repeat is by reference
        assert sent1[sid]["offer_bytes"] - sent2[sid]["offer_bytes"] >= weights
    assert "weights sent to 3 of 3 sellers" in first.stdout and "weights sent to 0 of 3 sellers" in second.stdout


def test_own_llama_through_a_local_flower_deployment_gives_the_same_valuations(workspace):
    # Prepare
    (workspace / "flower.toml").write_text(
        'runtime = "flower-deployment"\n'
        + "".join(f'[[sellers]]\nid = "{sid}"\ndata = "sellers/{sid}.jsonl"\n' for sid in SELLERS))
    prep = _tip_fed("buyer", "prepare", "buyer.toml", "--out", "query-flower", cwd=workspace)
    assert prep.returncode == 0, prep.stderr
    prepared = PreparedQuery.load(workspace / "query-flower")

    # Execute
    run = _tip_fed("value", "buyer.toml", "--sellers", "flower.toml", "--prepared", "query-flower", "--out",
                   "r-flower", cwd=workspace)

    # Assert
    assert run.returncode == 0, run.stderr + run.stdout
    _check(_valuations(workspace / "r-flower"), _plaintext(workspace, prepared), prepared)
    metrics = json.loads((workspace / "r-flower" / "metrics.json").read_text())
    assert metrics["run"]["runtime"] == "flower-deployment" and metrics["run"]["sellers"] == len(SELLERS)
