"""Per-session CKKS keys (buyer) and the validated public context (seller).

The buyer makes a fresh key pair for every session (:meth:`SessionKeys.generate`) and ships only
:meth:`SessionKeys.public_context_bytes`: encryption parameters, the public key in seeded form
(sellers re-randomise every reply with it and accept it only with its random half expanded from a
seed; :class:`~tip_fed.crypto.codec.SeededPublicKey` says why) and Galois keys for exactly the
rotation steps of the packing plan (the giant step and the fold steps: 6-9 keys instead of
TenSEAL's ~24 default ones), serialised seeded (half size): about 5 MB instead of 35 MB at
N = 8192. No secret key, no relinearisation keys (the seller never multiplies two ciphertexts).

The secret key never leaves :class:`SessionKeys`; :meth:`SessionKeys.destroy` drops it when the
session settles. Python cannot wipe memory, so "destroy" means every reference this object held is
released and TenSEAL's context is made public; later decryption raises :class:`CryptoError`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from tip_fed.errors import CodecError, ConfigError, CryptoError, InsecureParametersError

from .codec import (
    ciphertext_from_bytes,
    load_seal_key,
    load_tenseal_context,
    new_context_proto,
    read_public_context,
    read_seeded_public_key,
    seal_to_bytes,
    tenseal_errors,
)
from .costs import context_memory_bytes
from .params import HEParams, PackingPlan, check_params, security_bits
from .rerandomise import WideZero

__all__ = ["PublicContext", "SessionKeys", "clear_context_cache", "context_cache_bytes", "load_public_context"]


#: SEALContexts by serialised encryption parameters, shared by every session in the process. A
#: SEALContext holds only public parameters (primes, NTT tables, no key), and building one costs
#: ~40 ms at N = 8192, which a seller would otherwise pay on every Offer. Bounded by estimated
#: bytes, not entries: the buyer picks N and the primes, and one N = 32768 context with 15 primes
#: weighs as much as hundreds of N = 8192 ones.
SEAL_CONTEXT_CACHE_BYTES = 256 << 20
_SEAL_CONTEXTS: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
_SEAL_CONTEXTS_LOCK = threading.Lock()


def _shared_seal_context(parms_bytes: bytes, parms: Any, params: HEParams) -> Any:
    """The SEALContext of ``parms`` (already parsed from ``parms_bytes``), built once per process."""
    with _SEAL_CONTEXTS_LOCK:
        hit = _SEAL_CONTEXTS.get(parms_bytes)
        if hit is not None:
            _SEAL_CONTEXTS.move_to_end(parms_bytes)
            return hit[0]
    with tenseal_errors("building the CKKS context"):
        ctx = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise InsecureParametersError(
            f"SEAL refuses the received encryption parameters: {ctx.parameter_error_message()}"
        )
    size = context_memory_bytes(params)
    if size <= SEAL_CONTEXT_CACHE_BYTES:
        with _SEAL_CONTEXTS_LOCK:
            _SEAL_CONTEXTS[parms_bytes] = (ctx, size)
            while sum(n for _, n in _SEAL_CONTEXTS.values()) > SEAL_CONTEXT_CACHE_BYTES:
                _SEAL_CONTEXTS.popitem(last=False)
    return ctx


def context_cache_bytes() -> int:
    """Estimated bytes of the SEALContexts kept in the shared cache."""
    with _SEAL_CONTEXTS_LOCK:
        return sum(n for _, n in _SEAL_CONTEXTS.values())


def clear_context_cache() -> None:
    """Forget the shared SEALContexts (benchmarks measuring a seller's very first Offer)."""
    with _SEAL_CONTEXTS_LOCK:
        _SEAL_CONTEXTS.clear()


class _SealHandles:
    """sealapi objects derived from one SEALContext."""

    def __init__(self, seal_context: Any, params: HEParams) -> None:
        self.params = params
        self.seal_context = seal_context
        self.encoder = sa.CKKSEncoder(self.seal_context)
        self.evaluator = sa.Evaluator(self.seal_context)
        self.first_parms_id = self.seal_context.first_parms_id()
        self.last_parms_id = self.seal_context.last_parms_id()
        first = self.seal_context.first_context_data()
        # Data-level primes, in the order rescaling drops them (last first).
        self.primes = [float(m.value()) for m in first.parms().coeff_modulus()]
        self.galois_tool = first.galois_tool()

    def galois_elts(self, steps: tuple[int, ...]) -> list[int]:
        return list(self.galois_tool.get_elts_from_steps(list(steps)))

    def output_scale(self, masked: bool = True) -> float:
        """Scale of a reply: (scale * scale) / q_top after the BSGS rescale; the mask rescale
        (``masked``) multiplies by q_mid and divides by it again (same double arithmetic as SEAL)."""
        s = self.params.global_scale
        after_bsgs = (s * s) / self.primes[-1]
        return (after_bsgs * self.primes[-2]) / self.primes[-2] if masked else after_bsgs


class PublicContext:
    """A seller's view of a session: public key, needed Galois keys, no secret key."""

    def __init__(
        self, data: bytes, msg: Any, parms: Any, params: HEParams, n_threads: int | None = None
    ) -> None:
        """Use :func:`load_public_context` (it validates ``data``, its parsed ``msg`` and ``parms``)."""
        self.params = params
        self._data, self._n_threads = data, n_threads
        self._context: ts.Context | None = None
        seeded = read_seeded_public_key(bytes(msg.public_context.public_key), params)
        #: SHA-256 (hex) of the public key itself (seed and b half; not of its wire bytes, which
        #: another compression changes): what ties this context to one key pair (the same pair may
        #: be shipped with other Galois keys); what a seller's ledger remembers.
        self.public_key_digest = seeded.digest()
        self._public_key = seeded.canonical
        seal_context = _shared_seal_context(bytes(msg.encryption_parameters), parms, params)
        self.handles = _SealHandles(seal_context, params)
        # SEAL expands ``a`` from the seed while loading the bytes just checked: the seller
        # re-randomises every reply with that key, never with an ``a`` the buyer wrote.
        pk = load_seal_key(sa.PublicKey(), seal_context, seeded.canonical, "the public key")
        self.encryptor = sa.Encryptor(seal_context, pk)
        #: encryptions of zero with wide randomness: what replies are re-randomised with
        self.zero = WideZero(seal_context, pk)
        gk = bytes(msg.public_context.galois_keys)
        self.galois_keys = load_seal_key(sa.GaloisKeys(), seal_context, gk, "the Galois keys") if gk else None

    @property
    def context(self) -> ts.Context:
        """The same public context as a TenSEAL object (built on first use: only the naive
        baseline and introspection need it)."""
        if self._context is None:
            msg = new_context_proto(self._data)
            msg.public_context.public_key = self._public_key  # the key the seller checked, uncompressed
            self._context = load_tenseal_context(msg.SerializeToString(), self._n_threads, "public context")
            if self._context.has_secret_key() or self._context.is_private():
                raise CryptoError("refusing a context that contains a secret key")
        return self._context

    def require_rotations(self, steps: tuple[int, ...]) -> None:
        """Fail early (not deep inside SEAL) when a rotation key the plan needs is missing."""
        if not steps:
            return
        if self.galois_keys is None:
            raise CryptoError(
                f"the public context has no Galois keys but the packing needs rotations by "
                f"{list(steps)}; the buyer must send SessionKeys.public_context_bytes() for "
                "this plan"
            )
        elts = self.handles.galois_elts(steps)
        missing = [s for s, e in zip(steps, elts, strict=True) if not self.galois_keys.has_key(e)]
        if missing:
            raise CryptoError(
                f"the public context lacks rotation keys for steps {missing}; it was made for "
                "another packing plan: use the plan the buyer sent with this context"
            )


def _context_bytes(ctx: Any, what: str, *, secret: bool) -> bytes:
    """``ctx`` serialised with either its public key (what sellers get) or its secret key, never both,
    and without Galois or relinearisation keys (the public context carries only the plan's own)."""
    with tenseal_errors(f"serialising {what}", CryptoError):
        return bytes(ctx.serialize(save_public_key=not secret, save_secret_key=secret,
                                   save_galois_keys=False, save_relin_keys=False))


class SessionKeys:
    """The buyer's fresh CKKS key pair for one session, and what may be shown of it."""

    def __init__(self, context: ts.Context, plan: PackingPlan) -> None:
        """Use :meth:`generate`; this wraps an already private TenSEAL context."""
        if not context.has_secret_key():
            raise CryptoError("SessionKeys needs a private context; use SessionKeys.generate()")
        self._plan = plan
        self._ctx: ts.Context | None = context
        self._handles: _SealHandles | None = _SealHandles(context.seal_context().data, plan.params)
        sk = context.secret_key().data
        self._decryptor: Any = sa.Decryptor(self._handles.seal_context, sk)
        self._sym_encryptor: Any = sa.Encryptor(self._handles.seal_context, sk)
        self._public: bytes | None = None
        self._public_key: bytes | None = None

    @classmethod
    def generate(cls, plan: PackingPlan, *, n_threads: int | None = None) -> SessionKeys:
        """Fresh key pair for ``plan.params`` (>= 128-bit security: checked when the plan was made)."""
        if not isinstance(plan, PackingPlan):
            raise ConfigError(f"expected a PackingPlan, got {type(plan).__name__}")
        p = plan.params  # checked when the plan was made
        with tenseal_errors("creating the CKKS context", CryptoError):
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                p.poly_modulus_degree,
                -1,
                list(p.coeff_mod_bit_sizes),
                n_threads=n_threads,
            )
            ctx.global_scale = p.global_scale
        return cls(ctx, plan)

    @classmethod
    def open(cls, plan: PackingPlan) -> tuple[SessionKeys, bytes]:
        """What a buyer opening a session needs: a fresh key pair and its public context bytes."""
        keys = cls.generate(plan)
        return keys, keys.public_context_bytes()

    # ---- properties ---------------------------------------------------------------------------
    @property
    def plan(self) -> PackingPlan:
        return self._plan

    @property
    def params(self) -> HEParams:
        return self._plan.params

    @property
    def destroyed(self) -> bool:
        return self._ctx is None

    def _live(self) -> tuple[ts.Context, _SealHandles]:
        if self._ctx is None or self._handles is None:
            raise CryptoError(
                "the session's secret key was destroyed (session settled); start a new session "
                "with SessionKeys.generate() to encrypt or decrypt again"
            )
        return self._ctx, self._handles

    # ---- what is shipped ----------------------------------------------------------------------
    def public_context_bytes(self) -> bytes:
        """Public context for sellers: parameters, public key, only the plan's Galois keys."""
        if self._public is None:
            ctx, handles = self._live()
            public = _context_bytes(ctx, "the public context", secret=False)
            msg = new_context_proto(self.with_seeded_public_key(public))
            steps = self._plan.galois_steps
            if steps:
                keygen = sa.KeyGenerator(handles.seal_context, ctx.secret_key().data)
                with tenseal_errors("generating Galois keys", CryptoError):
                    # Serializable keys are saved seeded: half the bytes of expanded keys.
                    seeded = keygen.create_galois_keys(handles.galois_elts(steps))
                msg.public_context.galois_keys = seal_to_bytes(seeded, "saving Galois keys")
            self._public = msg.SerializeToString()
        return self._public

    def with_seeded_public_key(self, context: bytes) -> bytes:
        """``context`` (TenSEAL's serialisation of this session's public context, whose public key
        TenSEAL writes out in full) with the public key replaced by a seeded one: what sellers accept.

        A public key is an encryption of zero under the secret key at the key level; SEAL's
        symmetric encryption saves its random half as the seed it was expanded from. (TenSEAL does
        not expose SEAL's seeded ``create_public_key``; this is the same computation.)
        """
        _, h = self._live()
        if self._public_key is None:  # one public key per session, whatever context carries it
            with tenseal_errors("creating the seeded public key", CryptoError):
                seeded = self._sym_encryptor.encrypt_zero_symmetric(h.seal_context.key_parms_id())
            self._public_key = seal_to_bytes(seeded, "saving the public key")
        msg = new_context_proto(context)
        msg.public_context.public_key = self._public_key
        return bytes(msg.SerializeToString())

    def public_context(self, *, n_threads: int | None = None) -> PublicContext:
        """The seller-side view of this session, loaded exactly as a seller would."""
        return load_public_context(self.public_context_bytes(), self._plan, n_threads=n_threads)

    def _serialized_secret_key(self) -> bytes:
        """The secret key as TenSEAL serialises it: what the fingerprint hashes; never sent anywhere."""
        ctx, _ = self._live()
        private = _context_bytes(ctx, "the secret key", secret=True)
        return bytes(new_context_proto(private).private_context.secret_key)

    def secret_key_fingerprint(self) -> str:
        """sha256 hex of the serialised secret key: identifies the key without revealing it."""
        return hashlib.sha256(self._serialized_secret_key()).hexdigest()

    def _tenseal_context(self) -> ts.Context:
        """The private TenSEAL context (secret key inside): for the naive baseline only."""
        return self._live()[0]

    def destroy(self) -> None:
        """Drop the secret key; every later decrypt/encrypt raises CryptoError."""
        if self._ctx is not None:
            self._ctx.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
        self._ctx = None
        self._handles = None
        self._decryptor = None
        self._sym_encryptor = None

    # ---- slot-level encryption used by packing ------------------------------------------------
    def encrypt_slots(self, values: np.ndarray) -> bytes:
        """Encrypt S slot values at the top level with the secret key (seeded: half the bytes of
        a public-key ciphertext; equally secure, only the key holder can make them)."""
        _, h = self._live()
        pt = sa.Plaintext()
        with tenseal_errors("encrypting the query", CryptoError):
            h.encoder.encode(
                np.asarray(values, dtype=np.float64).tolist(),
                h.first_parms_id,
                self.params.global_scale,
                pt,
            )
            seeded = self._sym_encryptor.encrypt_symmetric(pt)
        return seal_to_bytes(seeded, "saving the query ciphertext")

    def decrypt_slots(self, data: bytes, what: str, *, any_level: bool = False) -> np.ndarray:
        """Decrypt one reply ciphertext; unless ``any_level`` it must be at the last level
        with the reply scale (anything else is not a reply of this protocol)."""
        _, h = self._live()
        ct = ciphertext_from_bytes(
            h.seal_context,
            self.params,
            data,
            what=what,
            parms_id=None if any_level else h.last_parms_id,
            scale=None if any_level else h.output_scale(),
        )
        pt = sa.Plaintext()
        with tenseal_errors(f"decrypting {what}", CryptoError):
            self._decryptor.decrypt(ct, pt)
            return np.asarray(h.encoder.decode_double(pt), dtype=np.float64)


def load_public_context(
    data: bytes, params: HEParams | PackingPlan, *, n_threads: int | None = None
) -> PublicContext:
    """Validate and load a buyer's public context (seller side).

    ``params``: the session's CKKS parameters, or its packing plan, whose parameters were checked
    when the plan was made (bare parameters are checked here).
    Raises InsecureParametersError (params or context below 128 bits), CryptoError (context holds
    a secret key), CodecError (empty/garbage/truncated/oversized bytes, other parameters).
    """
    if isinstance(params, PackingPlan):
        params = params.params
    else:
        check_params(params)
    msg, parms, actual = read_public_context(data, params)
    if security_bits(actual) < 128:
        raise InsecureParametersError(
            f"the received context has {actual.total_bits} coefficient bits at "
            f"N={actual.poly_modulus_degree}, below 128-bit security; refusing it"
        )
    if (actual.poly_modulus_degree, actual.coeff_mod_bit_sizes) != (
        params.poly_modulus_degree,
        params.coeff_mod_bit_sizes,
    ):
        raise CodecError(
            f"the received context has N={actual.poly_modulus_degree}, primes "
            f"{actual.coeff_mod_bit_sizes}; the session expects N={params.poly_modulus_degree}, "
            f"primes {params.coeff_mod_bit_sizes}: it belongs to another session or plan"
        )
    scale = msg.public_context.scale
    if scale != params.global_scale:
        raise CodecError(
            f"the received context's scale ({scale!r}) is not 2^{params.global_scale_bits}"
        )
    return PublicContext(bytes(data), msg, parms, params, n_threads)
