"""tip_fed.value over real gRPC seller services with mutual TLS, configured by a sellers.toml.

Two real grpcio servers on 127.0.0.1 wrap real Sellers; a third listed seller does not exist.
The buyer's client certificate and the CA come from the sellers.toml [tls] table (bound to seller
ids), decrypted totals are checked against plaintext, and a round where nobody answers is an
error, never an empty results directory.
"""


import pytest
import torch

import tip_fed
from tip_fed.buyer_config import load_sellers_config
from tip_fed.config import ProjectionConfig
from tip_fed.core.gradients import projected_grads
from tip_fed.core.influence import clip_rows
from tip_fed.core.tasks import get_task
from tip_fed.errors import SellerUnavailableError
from tip_fed.grpc import ServerTLS, start_server
from tip_fed.market.results import read_csv, read_json
from tip_fed.protocol import Buyer, BuyerSettings, Seller
from tip_fed.tls import create_ca, issue_cert

from ..conftest import TASK, free_port, make_data


@pytest.fixture(scope="module")
def prepared(model):
    return tip_fed.prepare(model, "classification", make_data(40, 2, shift=0.5), make_data(80, 3),
                           BuyerSettings(projection=ProjectionConfig(rank=4)))


@pytest.fixture
def mtls_sellers(seller_data, tmp_path):
    ca = create_ca(tmp_path)
    client = issue_cert(ca, tmp_path, "buyer", client=True)
    servers = {}
    try:
        for sid in ("s1", "s2"):
            cert = issue_cert(ca, tmp_path, sid, seller_id=sid)
            servers[sid] = start_server(Seller(sid, seller_data[sid]), tls=ServerTLS(cert.cert, cert.key, ca.cert))
        yield tmp_path, ca, client, servers
    finally:
        for running in servers.values():
            running.stop(0)


def test_value_from_sellers_toml_over_mutual_tls(model, seller_data, prepared, mtls_sellers):
    # Prepare
    d, ca, client, servers = mtls_sellers
    entries = [f'[[sellers]]\nid = "{sid}"\nendpoint = "{r.address}"\n' for sid, r in servers.items()]
    entries.append(f'[[sellers]]\nid = "ghost"\nendpoint = "127.0.0.1:{free_port()}"\n')
    (d / "sellers.toml").write_text(
        f'runtime = "grpc"\n[tls]\nca = "{ca.cert.name}"\ncert = "{client.cert.name}"\nkey = "{client.key.name}"\n'
        'bind-seller-id = true\n[grpc]\ntimeout-s = 30\nretries = 0\n' + "".join(entries))

    # Execute
    valuation = tip_fed.value(prepared, d / "sellers.toml")
    metrics = tip_fed.write_results(d / "out", prepared, valuation, runtime="grpc")

    # Assert
    assert [v.seller_id for v in valuation.sellers] == ["s1", "s2"] and valuation.missing == ["ghost"]
    assert "UNAVAILABLE" in valuation.manifest["seller_failures"]["ghost"]
    buyer = Buyer.from_prepared(prepared)
    tol = 1e-6 * buyer.query_norm * buyer.grad_norm_bound
    rows = {r["seller_id"]: r for r in read_csv(d / "out" / "valuations.csv")}
    for v in valuation.sellers:
        g = projected_grads(model, buyer.spec, TASK, seller_data[v.seller_id]).double()
        plain = (clip_rows(g, buyer.grad_norm_bound)[0] @ buyer.query).numpy()
        assert abs(v.total - plain.sum()) <= len(plain) * tol
        assert float(rows[v.seller_id]["score"]) == v.total and rows[v.seller_id]["score_plaintext"] == ""
    assert metrics["run"]["missing"] == ["ghost"]
    [session] = read_json(d / "out" / "manifest.json")["sessions"]
    assert session["valuation"]["model_fingerprint"] == prepared.model_fingerprint


def test_a_seller_answering_under_another_id_is_refused(seller_data, prepared, mtls_sellers):
    """With bind-seller-id the TLS name must be the listed id: listing s1's endpoint as s2 fails.
    (Each seller pins its CA here, so [tls] names only the client certificate.)"""
    d, ca, client, servers = mtls_sellers
    (d / "swapped.toml").write_text(
        f'runtime = "grpc"\n[tls]\ncert = "{client.cert.name}"\nkey = "{client.key.name}"\n'
        f'bind-seller-id = true\n[grpc]\nretries = 0\n[[sellers]]\nid = "s2"\nendpoint = "{servers["s1"].address}"\n'
        f'ca = "{ca.cert.name}"\n[[sellers]]\nid = "s1"\nendpoint = "{servers["s1"].address}"\nca = "{ca.cert.name}"\n')
    valuation = tip_fed.value(prepared, load_sellers_config(d / "swapped.toml"), max_samples=100)
    assert [v.seller_id for v in valuation.sellers] == ["s1"] and valuation.missing == ["s2"]


def test_no_seller_answering_is_an_error(buyer_files):
    d = buyer_files
    (d / "sellers.toml").write_text(f'runtime = "grpc"\n[tls]\ninsecure = true\n[grpc]\nretries = 0\n'
                                    f'[[sellers]]\nid = "gone"\nendpoint = "127.0.0.1:{free_port()}"\n')
    with pytest.raises(SellerUnavailableError, match=r"no seller was valued: gone: .*UNAVAILABLE"):
        tip_fed.value_files(d / "buyer.toml", d / "sellers.toml", d / "out")
    assert not (d / "out").exists()


@pytest.fixture
def buyer_files(model, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    tip_fed.save_dataset(make_data(20, 2), tmp_path / "obj.safetensors")
    (tmp_path / "buyer.toml").write_text('[model]\ntask = "classification"\nmlp = [10, 16, 2]\nweights = '
                                         '"w.safetensors"\n[data]\nobjective = "obj.safetensors"\n'
                                         '[projection]\nrank = 4\n')
    return tmp_path


def test_a_save_pretrained_language_model_from_buyer_toml(tmp_path):
    """[model] path = a Hugging Face save_pretrained directory, task causal-lm: prepared from buyer.toml,
    valued in-process, totals equal the plaintext reference."""
    import transformers

    from tip_fed.buyer_config import load_buyer_config, prepare_from_config
    from tip_fed.protocol.model import model_fingerprint

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")

    def tokens(n, seed):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 64, (n, 12), generator=g), "attention_mask": torch.ones(n, 12).long()}

    tip_fed.save_dataset(tokens(6, 1), tmp_path / "obj.safetensors")
    (tmp_path / "buyer.toml").write_text(
        '[model]\ntask = "causal-lm"\npath = "lm"\n[data]\nobjective = '
        '"obj.safetensors"\n[projection]\nrank = 4\n[preconditioner]\nkind = "ekfac"\n'
    )
    prepared = prepare_from_config(load_buyer_config(tmp_path / "buyer.toml"))
    sellers = {"a": tokens(5, 2), "b": tokens(7, 3)}

    valuation = tip_fed.value(prepared, sellers)

    buyer = Buyer.from_prepared(prepared)
    lm = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "lm").eval()
    task = get_task("causal-lm")
    assert prepared.model_fingerprint == model_fingerprint(lm)
    for v in valuation.sellers:
        g = projected_grads(lm, buyer.spec, task, sellers[v.seller_id]).double()
        plain = (clip_rows(g, buyer.grad_norm_bound)[0] @ buyer.query).numpy()
        assert abs(v.total - plain.sum()) <= len(plain) * 1e-6 * buyer.query_norm * buyer.grad_norm_bound
    assert [v.seller_id for v in valuation.sellers] == ["a", "b"]
