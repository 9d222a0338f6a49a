"""A complex query: a second functional hidden in the imaginary part of every released slot.

CKKS slots are complex and a seller cannot see what the query encrypts. A buyer that encrypts
``v + i S w`` instead of ``v`` gets back ``<v, row> + i S <w, row>`` in every output slot: with only
uniform noise of +-2^12 slot units in the imaginary parts, ``<w, row>`` comes out to ~2^12 / S. The
seller's imaginary pad (``tip_fed/crypto/sanitise.py``) fills the imaginary parts with noise of the
order of the whole headroom of the last modulus, so the hidden functional is drowned for every S,
while the real parts (what the buyer is sold) decrypt as before.
"""

import numpy as np
import pytest
import tenseal.sealapi as sa

from tip_fed.crypto import decrypt_scores, encrypt_query, plan_packing, sanitise, score_rows
from tip_fed.crypto.codec import ciphertext_polys, load_seal, polys_blob, seal_to_bytes
from tip_fed.crypto.keys import SessionKeys
from tip_fed.crypto.packing import _query_slots
from tip_fed.crypto.params import MAX_QUERY_NORM
from tip_fed.crypto.sanitise import FLOOD_STD, decrypt_complex, imaginary_pad
from tip_fed.protocol import Seller
from tip_fed.protocol import buyer as buyer_module
from tip_fed.protocol.reply import decode_reply

from ..conftest import make_data

_SEAL_VERSION = tuple(seal_to_bytes(sa.Ciphertext())[3:5])  # (major, minor) of the SEAL in use
DIM, N_ROWS = 64, 1024  # |r| of unrelated values over 1024 rows has std 1/32: 0.2 is a 6-sigma bound


@pytest.fixture(scope="module")
def session():  # type: ignore[no-untyped-def]
    """(plan, keys, public context) per dimension, one key pair each for the module."""
    made: dict[int, tuple] = {}

    def get(dim: int) -> tuple:
        if dim not in made:
            plan = plan_packing(dim, 1)
            keys = SessionKeys.generate(plan)
            made[dim] = (plan, keys, keys.public_context())
        return made[dim]

    yield get
    for _, keys, _ in made.values():
        keys.destroy()


def _rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * rng.uniform(0.2, 1.0, (n, 1))


def _complex_query(keys, plan, v: np.ndarray, w: np.ndarray) -> list[bytes]:  # type: ignore[no-untyped-def]
    """What a buyer holding the secret key can send: the query copies of ``v + i w``."""
    _, h = keys._live()
    out = []
    for re, im in zip(_query_slots(plan, v), _query_slots(plan, w), strict=True):
        for a, b in zip(re, im, strict=True):
            pt = sa.Plaintext()
            h.encoder.encode([complex(z) for z in a + 1j * b], h.first_parms_id, plan.params.global_scale, pt)
            out.append(seal_to_bytes(keys._sym_encryptor.encrypt_symmetric(pt)))
    return out


def _hidden(keys, plan, replies: list[bytes], n_rows: int, s: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The buyer's reading of the hidden functional: imaginary parts of the output slots / S."""
    out = np.empty(n_rows)
    for blob, block in zip(replies, plan.layout(n_rows), strict=True):
        out[block.start : block.start + block.present] = decrypt_complex(keys, blob).imag[block.output_slots] / s
    return out


def _slots_of(keys, coeffs: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Decoded slots of the plaintext with these signed coefficients (a reply whose c1 is 0)."""
    _, h = keys._live()
    q0 = int(h.seal_context.last_context_data().parms().coeff_modulus()[0].value())
    n = coeffs.shape[0]
    polys = np.stack([np.mod(coeffs, q0)] * 2).astype(np.uint64)[:, None, :]  # SEAL refuses c1 = 0 here
    members = (np.asarray(h.last_parms_id, dtype="<u8").tobytes(), 0, 2, n, 1, h.output_scale(), 1)
    ct = load_seal(sa.Ciphertext(), h.seal_context, polys_blob(_SEAL_VERSION, members, polys))
    h.evaluator.transform_to_ntt_inplace(ct)
    ntt = ciphertext_polys(ct, "a test plaintext")[2]
    ntt[1] = 0
    return decrypt_complex(keys, polys_blob(_SEAL_VERSION, (members[0], 1, *members[2:]), ntt))


def test_the_pad_is_purely_imaginary(session):
    """P_0 = 0, P_k = P_{N-k}: every slot of the pad is imaginary (to CKKS decoding precision)."""
    plan, keys, _ = session(DIM)
    n = plan.params.poly_modulus_degree
    pad = imaginary_pad(n, 2**58)
    assert pad[0] == 0 and np.array_equal(pad[1:], pad[1:][::-1]) and np.abs(pad).max() > 2**57
    slots = _slots_of(keys, pad)
    assert slots.imag.std() > 2**20  # ~2^58 sqrt(N / 3) / 2^40 slot units
    assert np.abs(slots.real).max() < 1e-3  # float rounding of 2^58-sized coefficients
    # the other sign convention would be purely real
    wrong = pad.copy()
    wrong[n // 2 + 1 :] *= -1
    wrong[n // 2] = 0
    assert np.abs(_slots_of(keys, wrong).real).std() > 2**20


def test_complex_query_second_functional_is_drowned(session):
    plan, keys, ctx = session(DIM)
    rng = np.random.default_rng(5)
    v = rng.normal(size=DIM)
    v *= 3 / np.linalg.norm(v)
    w = rng.normal(size=DIM)
    w /= np.linalg.norm(w)
    rows = _rows(rng, N_ROWS, DIM)
    # without the seller's imaginary sanitisation the attack reads <w, row> exactly
    query = _complex_query(keys, plan, v, 2.0**22 * w)
    bare = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(1), imag_bound=0.0)
    leaked = _hidden(keys, plan, bare, N_ROWS, 2.0**22)
    assert np.abs(leaked - rows @ w).max() < 1e-2 and np.corrcoef(leaked, rows @ w)[0, 1] > 0.99
    corr = {}
    for bits in (10, 14, 20, 26, 32):
        query = _complex_query(keys, plan, v, 2.0**bits * w)
        replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(bits))
        corr[bits] = float(np.corrcoef(_hidden(keys, plan, replies, N_ROWS, 2.0**bits), rows @ w)[0, 1])
        if bits <= 20:  # the buyer's own imaginary signal is too small to wrap: the real part is intact
            np.testing.assert_allclose(decrypt_scores(keys, plan, replies, N_ROWS), rows @ v, atol=1e-6 + 8 * FLOOD_STD)
    print(f"\nhidden functional's correlation with the truth over {N_ROWS} rows, by log2 S: {corr}")
    assert all(abs(r) < 0.2 for r in corr.values())


def _worst_scores(keys, n: int, j: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Signs of the scores that pile up on coefficient ``j`` (slot k's share of it is Re zeta_k^-j)."""
    mono = np.zeros(n, dtype=np.int64)
    mono[j] = 2**40
    return np.where(_slots_of(keys, mono).real >= 0, 1.0, -1.0)


@pytest.mark.parametrize("dim", [16, 64])  # a full block of S rows (every slot a score), a folded one
def test_an_honest_worst_case_reply_never_wraps(session, dim: int, monkeypatch: pytest.MonkeyPatch):
    """Scores at the bound and aligned on one coefficient, fills and imaginary noise at their
    largest, the pad at +L or -L on every coefficient: the padded reply still decrypts to the scores."""
    plan, keys, ctx = session(dim)
    x = np.random.default_rng(2).normal(size=dim)
    x *= MAX_QUERY_NORM / np.linalg.norm(x)
    query = encrypt_query(keys, plan, x)
    n_rows = plan.layout(plan.slots)[0].present
    n = plan.params.poly_modulus_degree
    drawn = sanitise.imaginary_pad
    for j in (0, 1, n // 3):
        signs = _worst_scores(keys, n, j)[plan.layout(n_rows)[0].output_slots][:n_rows]
        rows = signs[:, None] * (x / np.linalg.norm(x))[None, :]
        for extreme in (0, 1, -1):
            if extreme:  # the pad's own extremes: the honest coefficients' bound is all that protects them
                monkeypatch.setattr(sanitise, "imaginary_pad",
                                    lambda n, room, e=extreme: e * room * np.r_[0, np.ones(n - 1, dtype=np.int64)])
            else:
                monkeypatch.setattr(sanitise, "imaginary_pad", drawn)
            replies = score_rows(ctx, plan, query, rows, rng=np.random.default_rng(j), fill_bound=2.0**16,
                                 imag_bound=2.0**16)
            got = decrypt_scores(keys, plan, replies, n_rows)
            np.testing.assert_allclose(got, rows @ x, atol=1e-4)  # a wrap adds q0 X^j: ~2^20 in every slot
            assert decrypt_complex(keys, replies[0]).imag.std() > 2**20  # the pad is there


def test_a_complex_offer_gets_one_exact_answer_not_two(make_buyer, monkeypatch: pytest.MonkeyPatch):
    """End to end (aggregate disclosure, exact answer): the buyer's Offer carries Enc(v + i S w).
    Without the pad it read <w, mean row> to ~2.6e-6 at S = 2^27; with it, every time, the reading is
    off by far more than that (the pad's noise is ~2^24 / S ~ 0.1 here)."""
    s = 2.0**27
    seen: dict[str, np.ndarray] = {}

    def complex_query(keys, plan, x):  # type: ignore[no-untyped-def]
        w = np.random.default_rng(7).normal(size=plan.dim)
        seen["v"], seen["w"] = x, w / np.linalg.norm(w)
        return _complex_query(keys, plan, x, s * seen["w"])

    monkeypatch.setattr(buyer_module, "encrypt_query", complex_query)
    errors = []
    for seed in range(6):
        seller = Seller(f"seller{seed}", make_data(60, 41 + seed))
        buyer = make_buyer(disclosure="aggregate")
        offer = buyer.offer(max_samples=1000)
        session = buyer._sessions[buyer.session_id]
        reply = decode_reply(seller.respond(offer))
        block = session.plan.layout(1)[0]
        z = decrypt_complex(session.keys, reply.scores[0])[block.output_slots][0]
        mean = seller.deliver(buyer.session_id).gradients.mean(0) / buyer.grad_norm_bound  # ground truth
        errors.append(abs(z.imag / s - float(seen["w"] @ mean)))
    print(f"\ncomplex Offer, hidden functional's error at S = 2^27 over 6 sellers: {np.round(errors, 4)}")
    assert min(errors) > 1e-4
