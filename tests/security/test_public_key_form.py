"""A buyer-made public key must not open a reply's second half (threat-model rows A2d, A5).

The attack: the seller re-randomises every reply by adding a public-key encryption
``(u b + e0 + fill, u a + e1)`` under the buyer's key ``(b, a)``. A buyer that sends the key
``(0, P)`` with ``P`` of its choosing, and query copies whose *second* half carries a second
chosen vector, reads the reply's second half ``res.c1 + u P + e1`` with ``u P`` known or tiny:
one reply then gives two exact functionals of the seller's rows, and the second carries no
flooding. The fix here: the seller accepts only a public key whose ``a`` is expanded from a seed,
and re-randomises with the key SEAL expanded. It closes the ``a`` channel (a chosen or trapdoored
``a``); the ``b`` half stays the buyer's, and a lying ``b`` is met by the seller's wide ``u``
(``tip_fed/crypto/rerandomise.py``). Every attack here is built
from the public wire format (SEAL serialisations written byte by byte) and runs against real
TenSEAL and the real Seller.
"""

import struct
import zlib

import numpy as np
import pytest
import tenseal.sealapi as sa
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tip_fed.crypto import SessionKeys, codec, load_public_context, plan_packing, rerandomise, score_rows
from tip_fed.crypto.packing import _query_slots
from tip_fed.errors import CodecError, UnseededKeyError
from tip_fed.protocol import Seller, SellerPolicy
from tip_fed.protocol.ledger import KeyReuseError, LedgerPolicy
from tip_fed.testing import secret_key_bytes
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

from .fuzzing import fuzz, mutated_bytes, tip_or_result

HEADER = struct.Struct("<HBBBBHQ")  # SEAL: magic, header size, version, compression, reserved, size
MEMBERS = struct.Struct("<32sBQQQdQ")  # SEAL 4 ciphertext: parms_id, ntt, size, N, primes, scale, correction
SEED_INFO_BYTES = HEADER.size + 65
MAGIC = 0xA15E


# ---- SEAL's ciphertext format, read and written independently of tip_fed's codec -----------------
def _body(blob: bytes) -> bytes:
    magic, _hs, _maj, _min, compr, _r, size = HEADER.unpack_from(blob)
    assert magic == MAGIC and size == len(blob) and compr in (0, 2)
    rest = blob[HEADER.size :]
    return rest if compr == 0 else zstandard.ZstdDecompressor().decompressobj().decompress(rest)


def _read(blob: bytes):
    """(header version and members, polys (size x primes x N uint64), seed info bytes or None) of a
    SEAL ciphertext."""
    body = _body(blob)
    members = (blob[3:5], *MEMBERS.unpack_from(body))
    _version, _pid, _ntt, size, n, primes, _scale, _corr = members
    at = MEMBERS.size + HEADER.size
    (count,) = struct.unpack_from("<Q", body, at)
    data = np.frombuffer(body, dtype="<u8", count=count, offset=at + 8)
    seeded = count == n * primes
    polys = data.reshape((1 if seeded else size), primes, n)
    return members, polys, body[at + 8 + 8 * count :] if seeded else None


def _write(members, polys: np.ndarray, seed_info: bytes | None = None, compr: int = 0) -> bytes:
    """A SEAL ciphertext (a public key is one) with exactly these polynomials (or c0 and a seed),
    uncompressed (``compr`` 0), zlib- (1) or zstd-compressed (2)."""
    (major, minor), pid, ntt, _size, n, _primes, scale, corr = members
    size = 2 if seed_info is not None else polys.shape[0]
    arr = np.ascontiguousarray(polys, dtype="<u8").tobytes()
    array = HEADER.pack(MAGIC, 16, major, minor, 0, 0, HEADER.size + 8 + len(arr)) + struct.pack("<Q", len(arr) // 8)
    body = MEMBERS.pack(pid, ntt, size, n, polys.shape[1], scale, corr) + array + arr + (seed_info or b"")
    if compr == 1:
        body = zlib.compress(body)
    elif compr == 2:
        c = zstandard.ZstdCompressor(level=19).compressobj()
        body = c.compress(body) + c.flush()
    return HEADER.pack(MAGIC, 16, major, minor, compr, 0, HEADER.size + len(body)) + body


def _with_key(context: bytes, public_key: bytes) -> bytes:
    msg = codec.new_context_proto(context)
    msg.public_context.public_key = public_key
    return msg.SerializeToString()


def _public_key(context: bytes) -> bytes:
    return bytes(codec.new_context_proto(context).public_context.public_key)


# ---- the attack ------------------------------------------------------------------------------------
DIM, N_ROWS = 8, 64


@pytest.fixture(scope="module")
def session():
    """A buyer's session for an 8-dimensional projection: 8 query copies, so no rotation and no mask."""
    plan = plan_packing(DIM, N_ROWS, query_copies=8)
    assert plan.galois_steps == ()
    keys = SessionKeys.generate(plan)
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(N_ROWS, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return plan, keys, rows


class _SealZero:
    """How a seller re-randomised before: SEAL's own public-key encryption of zero (ternary u)."""

    def __init__(self, seal_context, key) -> None:
        self.seal_context, self.encryptor = seal_context, sa.Encryptor(seal_context, key)

    def encrypt_zero(self, parms_id, scale):
        pt, ct = sa.Plaintext(), sa.Ciphertext()
        sa.CKKSEncoder(self.seal_context).encode([0.0], parms_id, scale, pt)
        self.encryptor.encrypt(pt, ct)
        return ct


def _crafted_key(keys: SessionKeys, b: np.ndarray, a: np.ndarray) -> bytes:
    """The key (b, a) written out in full, with the metadata of the buyer's honest key."""
    members, _, _ = _read(_public_key(keys.public_context_bytes()))
    return _write(members, np.stack([b, a]))


def _key_polys(keys: SessionKeys):
    """(metadata, 0, P) with P the constant q_sp (the special prime): SEAL encrypts at the key level
    and divides by q_sp, so an encryption under (0, P) has c1 = u + round(e1 / q_sp) = u, ternary."""
    members, c0, _ = _read(_public_key(keys.public_context_bytes()))
    _, h = keys._live()
    primes = [int(m.value()) for m in h.seal_context.key_context_data().parms().coeff_modulus()]
    p = np.array([[primes[-1] % q] for q in primes], dtype=np.uint64) * np.ones_like(c0[0])
    return members, np.zeros_like(c0[0]), p


def _encoding_of(keys: SessionKeys, values: np.ndarray, key) -> np.ndarray:
    """The NTT coefficients of encode(values) at the query level: c0 of an encryption under (0, P)
    (c0 = encode(values) + round(e0 / q_sp) = encode(values))."""
    _, h = keys._live()
    pt = sa.Plaintext()
    h.encoder.encode(values.tolist(), h.first_parms_id, keys.params.global_scale, pt)
    ct = sa.Ciphertext()
    sa.Encryptor(h.seal_context, key).encrypt(pt, ct)
    return _read(codec.seal_to_bytes(ct))[1][0]


def _crafted_query(plan, keys: SessionKeys, x1: np.ndarray, x2: np.ndarray) -> list[bytes]:
    """Query copies (encode(x1 copy), encode(x2 copy)): the first half asks for rows @ x1, the second for rows @ x2."""
    _, zero, p = _key_polys(keys)
    _, h = keys._live()
    key = codec.load_seal_key(sa.PublicKey(), h.seal_context, _crafted_key(keys, zero, p), "crafted key")
    template = _read(keys.encrypt_slots(np.zeros(plan.slots)))[0]  # a query's metadata (level, scale)
    out = []
    for copies1, copies2 in zip(_query_slots(plan, x1), _query_slots(plan, x2), strict=True):
        for s1, s2 in zip(copies1, copies2, strict=True):
            out.append(_write(template, np.stack([_encoding_of(keys, s1, key), _encoding_of(keys, s2, key)])))
    return out


def _decode_half(keys: SessionKeys, reply: bytes, half: int) -> np.ndarray:
    """One half of a reply decoded as if it were a plaintext: the ciphertext (half, 0) decrypts to it."""
    members, polys, _ = _read(reply)
    alone = np.stack([polys[half], np.zeros_like(polys[half])])
    return keys.decrypt_slots(_write(members, alone), "one reply half", any_level=True)


def _attack(plan, keys, rows, context) -> tuple[float, float]:
    """Largest error of the two functionals the buyer reads from one reply: (first half, second half)."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=DIM), rng.normal(size=DIM)
    reply = score_rows(context, plan, _crafted_query(plan, keys, x1, x2), rows, rng=np.random.default_rng(5))
    [block] = plan.layout(N_ROWS)
    r = block.rows
    assert len(reply) == 1
    slots = plan.output_slots(r, N_ROWS)
    first = _decode_half(keys, reply[0], 0)[slots]
    second = _decode_half(keys, reply[0], 1)[slots]
    return float(np.abs(first - rows @ x1).max()), float(np.abs(second - rows @ x2).max())


def test_the_attack_reads_two_exact_functionals_when_the_seller_encrypts_under_the_crafted_key(session):
    """The attack works: a seller re-randomising with SEAL's encryption of zero under the key (0, P)
    (what a seller that loaded the buyer's full key did) hands out rows @ x2 to ~1e-10."""
    plan, keys, rows = session
    _, zero, p = _key_polys(keys)
    seller_view = load_public_context(keys.public_context_bytes(), plan)
    seal_context = seller_view.handles.seal_context
    crafted = codec.load_seal_key(sa.PublicKey(), seal_context, _crafted_key(keys, zero, p), "crafted key")
    seller_view.zero = _SealZero(seal_context, crafted)
    first, second = _attack(plan, keys, rows, seller_view)
    assert first < 1e-4  # rows @ x1, flooded (2^-18) as every released value is
    assert second < 1e-8  # rows @ x2, exact: a second answer, never flooded


@pytest.mark.parametrize("form", ["crafted (0, P)", "honest key written out"])
def test_a_public_key_with_its_random_half_written_out_is_refused(session, form):
    plan, keys, _ = session
    context = keys.public_context_bytes()
    if form == "crafted (0, P)":
        _, zero, p = _key_polys(keys)
        key = _crafted_key(keys, zero, p)
    else:  # TenSEAL's own serialisation: the same key pair, a in full
        key = _public_key(keys._tenseal_context().serialize(save_public_key=True, save_secret_key=False,
                                                            save_galois_keys=False, save_relin_keys=False))
    with pytest.raises(UnseededKeyError, match="expanded from a seed"):
        load_public_context(_with_key(context, key), plan)


def test_the_seller_refuses_a_full_key_offer_over_the_wire(make_buyer, seller_data):
    """Through the real Seller: the Offer carrying the crafted key is refused before anything is
    charged, and the honest Offer of the same session is answered afterwards."""
    offer = make_buyer().offer(max_samples=100)
    msg = pb.Offer.FromString(offer)
    members, c0, _ = _read(_public_key(msg.public_context))
    crafted = _write(members, np.stack([np.zeros_like(c0[0]), np.full_like(c0[0], 12345)]))
    msg.public_context = _with_key(msg.public_context, crafted)
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True))
    with pytest.raises(UnseededKeyError):
        seller.respond(msg.SerializeToString())
    assert pb.Reply.FromString(seller.respond(offer)).n_samples == seller.n_samples


def test_the_best_seeded_key_leaves_the_second_half_masked(session):
    """The (0, P) attack's key in seeded form: b = 0 and any seed. ``a`` is whatever the seed
    expands to, not P: no field of the form holds it, and SEAL expands it while the seller loads
    the key. The second half is then masked by u a."""
    plan, keys, rows = session
    members, c0, seed_info = _read(_public_key(keys.public_context_bytes()))
    assert seed_info is not None and c0.shape[0] == 1  # only b travels, and the seed
    seeded = _write(members, np.zeros_like(c0), seed_info)
    context = load_public_context(_with_key(keys.public_context_bytes(), seeded), plan)
    first, second = _attack(plan, keys, rows, context)
    assert first < 1e-4  # one functional, flooded: what any buyer gets from one answer
    assert second > 1e3  # the second is drowned in u a (uniform mod q, ~2^60 / 2^40 per slot)


def test_a_key_reserialised_otherwise_is_the_same_key_for_the_ledger(make_buyer, seller_data):
    """Reuse across sessions is caught on the key, not its bytes: the first session's key sent
    uncompressed, zlib-compressed or zstd-compressed at another level, is refused in a new session."""
    buyer = make_buyer()
    first = buyer.offer(max_samples=100)
    uncapped = LedgerPolicy(max_exact=None, total_max_exact=None)  # the key, not the lifetime cap, refuses
    seller = Seller("s0", seller_data["s0"], policy=SellerPolicy(exact_per_sample=True, lifetime=uncapped))
    seller.respond(first)
    old_context = pb.Offer.FromString(first).public_context
    members, c0, seed_info = _read(_public_key(old_context))
    forms = {f"compression {c}": _write(members, c0, seed_info, c) for c in (0, 1, 2)}  # none, zlib, zstd -19
    assert len({*forms.values(), _public_key(old_context)}) == 4  # four different byte strings
    for form in forms.values():
        second = buyer.offer(max_samples=100)
        msg = pb.Offer.FromString(second)
        msg.public_context = _with_key(old_context, form)
        with pytest.raises(KeyReuseError, match="fresh key pair"):
            seller.respond(msg.SerializeToString())
        assert pb.Reply.FromString(seller.respond(second)).n_samples == seller.n_samples


def test_a_seeded_key_for_other_parameters_or_damaged_is_refused(session):
    plan, keys, _ = session
    context = keys.public_context_bytes()
    members, c0, seed_info = _read(_public_key(context))
    bad_prng = seed_info[: HEADER.size] + bytes([7]) + seed_info[HEADER.size + 1 :]
    fewer_primes = (*members[:5], members[5] - 1, *members[6:])
    for key, match in [
        (_write(members, c0, bad_prng), "PRNG type 7"),
        (_write(fewer_primes, c0[:, :-1], seed_info), "other parameters"),
        (_write(members, c0, seed_info)[:-9], "truncated"),
        (b"\x5e\xa1" + bytes(30), "not a SEAL serialisation"),
    ]:
        with pytest.raises(CodecError, match=match):
            load_public_context(_with_key(context, key), plan)
    assert len(seed_info) == SEED_INFO_BYTES


@pytest.fixture(scope="module")
def key_forms(session):
    plan, keys, _ = session
    context = keys.public_context_bytes()
    members, c0, seed_info = _read(_public_key(context))
    return plan, context, [_write(members, c0, seed_info), _public_key(context)]


@fuzz(300)
@given(data=st.data(), form=st.sampled_from([0, 1]))
def test_the_public_key_reader_on_damaged_keys(key_forms, data, form):
    """Damaged seeded keys (uncompressed, where a flip lands in the structure, and zstd) are refused
    with a TipError or load as some seeded key, never anything else."""
    plan, context, forms = key_forms
    tip_or_result(load_public_context, _with_key(context, data.draw(mutated_bytes(forms[form]))), plan)


# ---- a trapdoor key that looks uniform ------------------------------------------------------------
def _ntt_secret(keys: SessionKeys) -> np.ndarray:
    """A fresh secret key: a short (ternary) polynomial, in NTT form at the key level (primes x N)."""
    raw = np.frombuffer(secret_key_bytes(keys, raw=True), dtype="<u8")
    return raw.reshape(-1, keys.params.poly_modulus_degree)


def _key_primes(keys: SessionKeys) -> list[int]:
    return [int(m.value()) for m in keys._live()[1].seal_context.key_context_data().parms().coeff_modulus()]


def _trapdoor(plan, keys: SessionKeys):
    """(f, a = g / f) with f, g short: an NTRU-style a that looks uniform mod q, whose maker can
    strip u a off anything (f (u a) = u g is short). f, g are two other fresh secret keys."""
    f, g = _ntt_secret(SessionKeys.generate(plan)), _ntt_secret(SessionKeys.generate(plan))
    a = np.empty_like(f)
    for i, q in enumerate(_key_primes(keys)):
        a[i] = [int(gi) * pow(int(fi), -1, q) % q for fi, gi in zip(f[i], g[i], strict=True)]
    return f, a


def _decode_complex(keys: SessionKeys, members, poly: np.ndarray) -> np.ndarray:
    """The slots of one polynomial at the reply level (as the plaintext of the ciphertext (poly, 0))."""
    _, h = keys._live()
    ct = codec.ciphertext_from_bytes(h.seal_context, keys.params, _write(members, np.stack([poly, 0 * poly])),
                                     what="one polynomial")
    pt = sa.Plaintext()
    keys._decryptor.decrypt(ct, pt)
    return np.asarray(h.encoder.decode_complex(pt))


def _trapdoor_read(plan, keys, rows, context, f) -> float:
    """Median error of rows @ x2 read from the reply's second half as (f c1) / f in the slots."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=DIM), rng.normal(size=DIM)
    [reply] = score_rows(context, plan, _crafted_query(plan, keys, x1, x2), rows, rng=np.random.default_rng(5))
    members, polys, _ = _read(reply)
    q0 = _key_primes(keys)[0]
    f0 = f[:1].astype(object)
    f_c1 = (f0 * polys[1].astype(object) % q0).astype(np.uint64)  # NTT form: the ring product is pointwise
    unit = (*members[:6], 1.0, members[7])  # f itself at scale 1: its slots are sigma(f)
    slots = _decode_complex(keys, members, f_c1) / _decode_complex(keys, unit, f[:1])
    [block] = plan.layout(N_ROWS)
    r = block.rows
    return float(np.median(np.abs(slots.real[plan.output_slots(r, N_ROWS)] - rows @ x2)))


def test_a_uniform_looking_trapdoor_key_opens_the_second_half_and_cannot_be_sent_seeded(session):
    """Why a full key that merely looks uniform is not enough, and why the seeded form stops it:
    a = g / f passes any uniformity test, yet its maker reads rows @ x2 out of a reply
    re-randomised under (0, a). The seeded form has no field for a: the key the seller holds has
    the a SEAL expands from the seed, and the trapdoor then reads noise."""
    plan, keys, rows = session
    f, a = _trapdoor(plan, keys)
    primes = np.array(_key_primes(keys), dtype=float)[:, None]
    assert abs(float((a / primes).mean()) - 0.5) < 0.01  # looks uniform mod each prime
    key = _crafted_key(keys, np.zeros_like(a), a)
    seller_view = load_public_context(keys.public_context_bytes(), plan)
    seal_context = seller_view.handles.seal_context
    seller_view.zero = _SealZero(seal_context, codec.load_seal_key(sa.PublicKey(), seal_context, key, "key"))
    assert _trapdoor_read(plan, keys, rows, seller_view, f) < 1e-6  # the second functional, exactly
    with pytest.raises(UnseededKeyError):
        load_public_context(_with_key(keys.public_context_bytes(), key), plan)

    members, c0, seed_info = _read(_public_key(keys.public_context_bytes()))
    seeded = load_public_context(_with_key(keys.public_context_bytes(), _write(members, 0 * c0, seed_info)), plan)
    held = codec.load_seal_key(sa.PublicKey(), seal_context, seeded._public_key, "held key")
    held_a = _read(codec.seal_to_bytes(held))[1][1]
    assert (held_a != a).mean() > 0.99  # the seller's a is the seed's expansion, not the trapdoor
    assert _trapdoor_read(plan, keys, rows, seeded, f) > 1e3


# ---- a seeded key with a lying b half ---------------------------------------------------------------
def _b_half_attack(plan, keys, rows, context, k: int, **sanitise) -> float:
    """The buyer's key is (b_honest + p k, a = expand(seed)): seeded, and no seller can tell it from
    an honest one. Decrypting with s gives fill + u k; rounding by k gives u when u is ternary. Then
    the second half minus round(u a / p) (SEAL's own NTT and division, in a context whose first
    level holds the key's primes) is rows @ x2. Returns that functional's median error.
    ``sanitise`` goes to the seller's score_rows."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=DIM), rng.normal(size=DIM)
    [reply] = score_rows(context, plan, _crafted_query(plan, keys, x1, x2), rows, rng=np.random.default_rng(5),
                          **sanitise)
    members, polys, _ = _read(reply)
    primes, h = _key_primes(keys), keys._live()[1]
    q0 = primes[0]
    d = (polys[0].astype(object) + polys[1].astype(object) * _ntt_secret(keys)[0].astype(object)) % q0
    ct = codec.ciphertext_from_bytes(h.seal_context, keys.params, _write(members, np.stack([d.astype(np.uint64)] * 2)),
                                     what="the decryption")
    h.evaluator.transform_from_ntt_inplace(ct)
    coeffs = [int(v) for v in _read(codec.seal_to_bytes(ct))[1][0][0]]
    u = np.array([round((v - q0 if v > q0 // 2 else v) / k) for v in coeffs], dtype=np.int64)
    ext = rerandomise._extended(keys.params.poly_modulus_degree, primes)
    zero = rerandomise.WideZero(h.seal_context, codec.load_seal_key(
        sa.PublicKey(), h.seal_context, context._public_key, "the key the seller holds"))
    u_ntt, _ = zero._ntt(u, u)
    ua = np.stack([(u_ntt[i].astype(object) * zero.a[i].astype(object) % q).astype(np.uint64)
                   for i, q in enumerate(primes)])
    x = zero._load_ext(zero._ext_blob(ua, ua, ntt=True))
    ev = sa.Evaluator(ext)
    ev.rescale_to_next_inplace(x)
    while len(codec.ciphertext_polys(x, "u a / p")[2][0]) > 1:
        ev.mod_switch_to_next_inplace(x)
    strip = codec.ciphertext_polys(x, "u a / p")[2][0]
    second = (polys[1].astype(object) - strip.astype(object)) % q0
    slots = keys.decrypt_slots(_write(members, np.stack([second, 0 * second]).astype(np.uint64)), "c1", any_level=True)
    [block] = plan.layout(N_ROWS)
    r = block.rows
    return float(np.median(np.abs(slots[plan.output_slots(r, N_ROWS)] - rows @ x2)))


@pytest.mark.parametrize("k", [2**57, 2**20, 1])
def test_a_lying_b_half_no_longer_exposes_the_sellers_randomness(session, k):
    """The seeded form cannot stop this one (b is the buyer's); the seller's wide u does. Against
    SEAL's ternary u the buyer reads rows @ x2 to ~1e-10; against u uniform in [-2^54, 2^54] the
    same reading is off by ~1e7, for every amplification k the buyer may pick."""
    plan, keys, rows = session
    context_bytes = keys.public_context_bytes()
    members, b, seed_info = _read(_public_key(context_bytes))
    primes = _key_primes(keys)
    lying = b.copy()
    for i, q in enumerate(primes[:-1]):  # + p k in the data primes, 0 mod p: b + a s = e + p k
        lying[0, i] = ((b[0, i].astype(object) + primes[-1] * k % q) % q).astype(np.uint64)
    context = load_public_context(_with_key(context_bytes, _write(members, lying, seed_info)), plan)  # accepted
    if k == 2**57:  # the old re-randomiser, under the very same key
        old = load_public_context(_with_key(context_bytes, _write(members, lying, seed_info)), plan)
        seal_context = old.handles.seal_context
        old.zero = _SealZero(seal_context, codec.load_seal_key(sa.PublicKey(), seal_context, old._public_key, "key"))
        # imag_bound=0: no imaginary pad either (its +-2^59 would hide u k on its own), the old seller
        assert _b_half_attack(plan, keys, rows, old, k, imag_bound=0.0) < 1e-8
    assert _b_half_attack(plan, keys, rows, context, k) > 1e3
