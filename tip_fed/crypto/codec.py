"""Bytes <-> SEAL/TenSEAL objects, validated at the boundary.

Why this module exists: TenSEAL/SEAL accept surprising input (``ckks_vector_from(ctx, b"")`` is a
silent empty vector, a foreign secret key decrypts to garbage) and fail with bare ``ValueError`` /
``RuntimeError``. Everything that crosses the wire goes through here, is size-checked against the
parameters *before* parsing, and every library error becomes a :class:`CodecError` that says what
was wrong. Messages never contain the offending bytes.

Wire formats: ciphertexts are plain SEAL serialisations (zstd-compressed, optionally seeded), and
so is the public key, which a seller accepts only seeded (:func:`read_seeded_public_key`);
contexts are TenSEAL ``TenSEALContextProto`` messages, read and written here with a private copy of
TenSEAL's schema (``tenseal/proto/tensealcontext.proto``) so the public context can carry exactly
the Galois keys the packing needs. ``tenseal.sealapi`` objects only save/load through file paths,
so bytes go through short-lived files in a private temp directory (tmpfs where available).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import zstandard
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from tip_fed.errors import CodecError, CryptoError, TipError, UnseededKeyError

from .params import HEParams

__all__ = [
    "SeededPublicKey",
    "ciphertext_from_bytes",
    "ciphertext_polys",
    "load_encryption_parameters",
    "load_seal",
    "load_tenseal_context",
    "max_ciphertext_bytes",
    "max_context_bytes",
    "new_context_proto",
    "parse_context_proto",
    "polys_blob",
    "read_public_context",
    "read_seeded_public_key",
    "seal_to_bytes",
    "tenseal_errors",
]

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
_COMPR_MODES = {0, 1, 2}  # none, zlib, zstd
_LIB_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError)


@contextlib.contextmanager
def tenseal_errors(what: str, kind: type[CryptoError] = CodecError) -> Iterator[None]:
    """Turn a TenSEAL/SEAL failure into a typed tip_fed error naming ``what`` failed."""
    try:
        yield
    except TipError:  # already typed (ConfigError/DataError are ValueErrors too)
        raise
    except _LIB_ERRORS as exc:
        # SEAL messages are short descriptions (e.g. "ciphertext data is invalid"), never data.
        raise kind(f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}") from None


# ---- size limits -------------------------------------------------------------------------------
def max_ciphertext_bytes(params: HEParams) -> int:
    """Largest acceptable serialised ciphertext: 2 polys at the top level, uncompressed, + slack."""
    n_data = len(params.coeff_mod_bit_sizes) - 1
    raw = 2 * n_data * params.poly_modulus_degree * 8
    return int(raw * 1.01) + 4096


def max_context_bytes(params: HEParams) -> int:
    """Largest acceptable public context: public key + relin key + a full default Galois key set."""
    n_all = len(params.coeff_mod_bit_sizes)
    key_ct = 2 * n_all * params.poly_modulus_degree * 8
    n_galois = 2 * params.poly_modulus_degree.bit_length() + 2
    return int((1 + (1 + n_galois) * (n_all - 1)) * key_ct * 1.01) + 65536


# ---- temp-file transport for sealapi objects ---------------------------------------------------
def _tmp_dir() -> str | None:
    shm = "/dev/shm"  # noqa: S108 - a directory for mkstemp-made files, not a fixed file name
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


_TMP_DIR = _tmp_dir()


@contextlib.contextmanager
def _temp_path() -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="tipfed-", suffix=".seal", dir=_TMP_DIR)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def seal_to_bytes(obj: Any, what: str = "serialising a SEAL object") -> bytes:
    """Serialise anything with ``save(path)`` (Ciphertext, keys, Serializable*) to bytes."""
    with _temp_path() as path, tenseal_errors(what, CryptoError):
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()


def _seal_load(load: Callable[[str], None], data: bytes) -> None:
    with _temp_path() as path:
        with open(path, "wb") as fh:
            fh.write(data)
        load(path)


def _check_blob(data: object, what: str, limit: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CodecError(f"{what} is empty (0 bytes); the sender produced no data")
    if len(data) > limit:
        raise CodecError(
            f"{what} is {len(data)} bytes, more than the {limit} bytes possible for these CKKS "
            "parameters; refusing to parse it"
        )
    return data


def _check_seal_header(data: bytes, what: str) -> None:
    """Cheap pre-parse check of SEAL's 16-byte header (magic, compression, declared size)."""
    if len(data) < _SEAL_HEADER.size:
        raise CodecError(f"{what} is truncated: {len(data)} bytes, shorter than a SEAL header")
    magic, hsize, _major, _minor, compr, _res, size = _SEAL_HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or compr not in _COMPR_MODES:
        raise CodecError(f"{what} is not a SEAL serialisation (bad header); wrong or garbage bytes")
    if size != len(data):
        raise CodecError(
            f"{what} is truncated or padded: header declares {size} bytes, got {len(data)}"
        )


def ciphertext_from_bytes(
    seal_context: Any,
    params: HEParams,
    data: object,
    *,
    what: str,
    parms_id: Any | None = None,
    scale: float | None = None,
) -> Any:
    """Parse and validate one ciphertext for ``seal_context``.

    ``parms_id`` / ``scale`` (when given) pin the level and scale the protocol expects, so a
    ciphertext from another step, level or parameter set is refused instead of mis-decoded.
    """
    blob = _check_blob(data, what, max_ciphertext_bytes(params))
    _check_seal_header(blob, what)
    ct = sa.Ciphertext()
    with tenseal_errors(f"parsing {what}"):
        _seal_load(lambda p: ct.load(seal_context, p), blob)
    if ct.poly_modulus_degree() != params.poly_modulus_degree or ct.size() != 2:
        raise CodecError(
            f"{what} has ring dimension {ct.poly_modulus_degree()} and {ct.size()} polynomials; "
            f"expected N={params.poly_modulus_degree} and 2 (ciphertext for other parameters)"
        )
    if parms_id is not None and list(ct.parms_id()) != list(parms_id):
        raise CodecError(
            f"{what} is at the wrong level ({ct.coeff_modulus_size()} primes); it was made for "
            "another step of the protocol or other parameters"
        )
    if scale is not None and not abs(ct.scale / scale - 1.0) < 1e-9:
        raise CodecError(f"{what} has scale 2^{_log2(ct.scale):.2f}, expected 2^{_log2(scale):.2f}")
    return ct


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else float("-inf")


def load_encryption_parameters(data: bytes) -> Any:
    """Serialised SEAL EncryptionParameters (must be CKKS) as a sealapi object."""
    _check_seal_header(data, "encryption parameters")
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    with tenseal_errors("parsing the encryption parameters"):
        _seal_load(parms.load, data)
    if parms.scheme() != sa.SCHEME_TYPE.CKKS:
        raise CodecError(f"the context uses scheme {parms.scheme().name}, expected CKKS")
    return parms


def load_seal_key(key: Any, seal_context: Any, data: bytes, what: str) -> Any:
    """Load a PublicKey/GaloisKeys object from bytes; SEAL checks it is valid for the context."""
    _check_seal_header(data, what)
    with tenseal_errors(f"loading {what}"):
        _seal_load(lambda p: key.load(seal_context, p), data)
    return key


def read_public_context(data: object, params: HEParams, what: str = "public context") -> tuple[Any, Any, HEParams]:
    """(context message, SEAL EncryptionParameters, the parameters they hold) of received context
    bytes, validated structurally (:func:`parse_context_proto`) and parsed once.

    The returned parameters are what the context really uses (N and the primes; the scale is
    ``params``'), for the caller to compare with what the session expects.
    """
    msg = parse_context_proto(data, params, what)
    parms = load_encryption_parameters(bytes(msg.encryption_parameters))
    return msg, parms, _encryption_params_of(parms, params)


def _encryption_params_of(parms: Any, expected: HEParams) -> HEParams:
    """N and prime sizes of parsed SEAL EncryptionParameters (:func:`load_encryption_parameters`)."""
    return HEParams(
        poly_modulus_degree=int(parms.poly_modulus_degree()),
        coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
        global_scale_bits=expected.global_scale_bits,
    )


# ---- TenSEAL context protobuf ------------------------------------------------------------------
def _build_context_message() -> type:
    """A private copy of TenSEAL's TenSEALContextProto (same field numbers, own pool/package)."""
    fd = descriptor_pb2.FieldDescriptorProto
    opt = fd.LABEL_OPTIONAL
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tip_fed/crypto/tensealcontext.proto", package="tip_fed_tenseal", syntax="proto3"
    )

    def add(name: str, fields: list[tuple[str, int, int, str]]) -> None:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, tname in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=opt)
            if tname:
                f.type_name = tname

    b, u32, f64, flag, sub = fd.TYPE_BYTES, fd.TYPE_UINT32, fd.TYPE_DOUBLE, fd.TYPE_BOOL, fd.TYPE_MESSAGE
    add("TenSEALPrivateProto", [("secret_key", 1, b, ""), ("relin_keys_generated", 2, flag, ""),
                                ("galois_keys_generated", 3, flag, "")])
    add("TenSEALPublicProto", [("public_key", 1, b, ""), ("auto_flags", 2, u32, ""), ("scale", 3, f64, ""),
                               ("relin_keys", 4, b, ""), ("galois_keys", 5, b, "")])
    add("TenSEALContextProto", [("encryption_parameters", 1, b, ""),
                                ("public_context", 2, sub, ".tip_fed_tenseal.TenSEALPublicProto"),
                                ("private_context", 3, sub, ".tip_fed_tenseal.TenSEALPrivateProto"),
                                ("encryption_type", 4, u32, "")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tip_fed_tenseal.TenSEALContextProto")
    )


_ContextProto = _build_context_message()


def new_context_proto(data: bytes) -> Any:
    """Parse trusted, locally produced context bytes (our own TenSEAL serialisation)."""
    msg = _ContextProto()
    msg.ParseFromString(data)
    return msg


def parse_context_proto(data: object, params: HEParams, what: str = "public context") -> Any:
    """Validate received context bytes structurally, before TenSEAL sees them.

    Refuses (CryptoError) a context that carries a secret key: the seller must never hold one,
    and refusing before loading keeps the key out of the seller's process memory too.
    """
    blob = _check_blob(data, what, max_context_bytes(params))
    msg = _ContextProto()
    try:
        msg.ParseFromString(blob)
    except DecodeError:
        raise CodecError(
            f"{what} is not a TenSEAL context (protobuf parse failed); garbage or truncated bytes"
        ) from None
    if msg.HasField("private_context") and msg.private_context.secret_key:
        raise CryptoError(
            f"refusing a context that contains a secret key ({what}); the buyer must send a "
            "public context (SessionKeys.public_context_bytes())"
        )
    if not msg.encryption_parameters or not msg.public_context.public_key:
        raise CodecError(
            f"{what} lacks encryption parameters or a public key; truncated or not "
            "a public CKKS context"
        )
    for name, blob_part in (
        ("encryption parameters", msg.encryption_parameters),
        ("public key", msg.public_context.public_key),
    ):
        _check_seal_header(bytes(blob_part), f"{what}: {name}")
    if msg.public_context.galois_keys:
        _check_seal_header(bytes(msg.public_context.galois_keys), f"{what}: Galois keys")
    return msg


# ---- seeded public keys ------------------------------------------------------------------------
#: SEAL 4's ciphertext members (a public key is one): parms_id, NTT flag, polynomial count, N,
#: prime count, scale, correction factor; then the coefficient array (its own SEAL header, a u64
#: count, the u64 coefficients) and, when seeded, the PRNG info (own header, type byte, 64-byte seed).
_CT_MEMBERS = struct.Struct("<32sBQQQdQ")
_ARRAY_COUNT = struct.Struct("<Q")
_SEED_INFO = struct.Struct("<B64s")
_PRNG_TYPES = {1: "blake2xb", 2: "shake256"}  # SEAL's prng_type: both are XOFs nobody can steer


@dataclass(frozen=True)
class SeededPublicKey:
    """A CKKS public key (b, a) in SEAL's seeded form: b, and the seed that a is expanded from.

    Why: a key whose random half ``a`` the buyer chose (``(0, P)``, or an NTRU-style ``a = g / f``
    with short ``f, g`` that looks uniform) lets the buyer strip the seller's re-randomisation
    ``u a + e1`` off a reply's second half and read it: a second exact functional of the seller's
    rows, without flooding. Expanded from a seed by a XOF, ``a`` is uniform and nobody holds a
    trapdoor for it. This closes the ``a`` channel only: ``b`` is still the buyer's, and a ``b``
    far from ``-a s`` (``b + a s`` large and known to the buyer) puts the seller's ``u`` into
    the decryption, after which ``u a`` can be subtracted again. A seller cannot tell such a
    ``b`` from an honest one without a proof that ``b + a s`` is short; it draws ``u`` too wide
    for that to work instead (:mod:`tip_fed.crypto.rerandomise`).
    """

    prng: int  #: SEAL prng_type of the expansion (1 blake2xb, 2 shake256)
    seed: bytes  #: 64 bytes
    b: bytes  #: the b half: N x primes little-endian u64 coefficients (NTT form)
    canonical: bytes  #: the same key as an uncompressed SEAL serialisation: what the seller loads

    def digest(self) -> str:
        """SHA-256 (hex) of the key itself, not of its bytes on the wire: the same key compressed
        otherwise has the same digest."""
        h = hashlib.sha256(b"tip-fed/public-key/v2\x00")
        h.update(bytes([self.prng]) + self.seed + self.b)
        return h.hexdigest()


def _decompressed(compr: int, payload: bytes, limit: int, what: str) -> bytes:
    """The members of a SEAL serialisation, at most ``limit`` bytes of them (a bomb stops there)."""
    try:
        if compr == 0:
            return payload[:limit]
        if compr == 1:
            return zlib.decompressobj().decompress(payload, limit)
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload))
        out = bytearray()
        while len(out) < limit and (part := reader.read(limit - len(out))):
            out += part
        return bytes(out)
    except (zlib.error, zstandard.ZstdError, ValueError, EOFError):
        raise CodecError(f"{what} does not decompress; garbage or truncated bytes") from None


def _seal_part(body: bytes, at: int, size: int, what: str) -> int:
    """Check the nested SEAL header at ``body[at:]`` (uncompressed, ``size`` bytes); offset after it."""
    if len(body) < at + _SEAL_HEADER.size:
        raise CodecError(f"{what} is truncated")
    magic, hsize, _major, _minor, compr, _res, declared = _SEAL_HEADER.unpack_from(body, at)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or compr != 0 or declared != size:
        raise CodecError(f"{what} has a malformed inner SEAL object; not a public key of these parameters")
    return at + _SEAL_HEADER.size


def read_seeded_public_key(data: object, params: HEParams, what: str = "the public key") -> SeededPublicKey:
    """Parse a received public key and accept it only in seeded form (see :class:`SeededPublicKey`).

    Raises UnseededKeyError for a key sent with its ``a`` half written out (TenSEAL's default
    serialisation, or a crafted key), CodecError for anything that is not a public key for ``params``.
    """
    n_primes, n = len(params.coeff_mod_bit_sizes), params.poly_modulus_degree
    poly = n * n_primes * 8
    array_head = _SEAL_HEADER.size + _ARRAY_COUNT.size
    seeded = _CT_MEMBERS.size + array_head + poly + _SEAL_HEADER.size + _SEED_INFO.size
    full = _CT_MEMBERS.size + array_head + 2 * poly
    blob = _check_blob(data, what, _SEAL_HEADER.size + full + 4096)  # zstd adds a little to random data
    _check_seal_header(blob, what)
    _magic, _hsize, major, minor, compr, _res, _size = _SEAL_HEADER.unpack_from(blob)
    body = _decompressed(compr, blob[_SEAL_HEADER.size :], max(seeded, full) + 1, what)
    if len(body) == full:
        raise UnseededKeyError(
            f"{what} carries its random half a written out, which the buyer could have chosen; a seller "
            "uses only a key whose a is expanded from a seed: send it seeded "
            "(SessionKeys.public_context_bytes() does)"
        )
    if len(body) != seeded:
        raise CodecError(
            f"{what} holds {len(body)} bytes of key data; a seeded public key for N={n} with {n_primes} "
            f"primes holds {seeded}: it belongs to other parameters or is damaged"
        )
    _pid, ntt, size, n_got, primes, scale, corr = _CT_MEMBERS.unpack_from(body)
    if (ntt, size, n_got, primes, scale, corr) != (1, 2, n, n_primes, 1.0, 1):
        raise CodecError(
            f"{what} is not a CKKS public key for N={n} with {n_primes} primes (it has {size} polynomials, "
            f"N={n_got}, {primes} primes)"
        )
    at = _seal_part(body, _CT_MEMBERS.size, array_head + poly, what)
    (count,) = _ARRAY_COUNT.unpack_from(body, at)
    if count != n * n_primes:
        raise CodecError(f"{what} declares {count} coefficients in its b half; expected {n * n_primes}")
    at += _ARRAY_COUNT.size
    b = body[at : at + poly]
    at = _seal_part(body, at + poly, _SEAL_HEADER.size + _SEED_INFO.size, what)
    prng, seed = _SEED_INFO.unpack_from(body, at)
    if prng not in _PRNG_TYPES:
        raise CodecError(f"{what} names PRNG type {prng}; a seed is expanded by blake2xb (1) or shake256 (2)")
    canonical = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, 0, 0, _SEAL_HEADER.size + len(body))
    canonical += body
    return SeededPublicKey(prng=prng, seed=seed, b=b, canonical=canonical)


def ciphertext_polys(obj: Any, what: str) -> tuple[tuple[int, int], tuple[Any, ...], np.ndarray]:
    """(SEAL version, members, polynomials (size x primes x N, uint64)) of a full-form ciphertext
    or public key made locally (a sealapi object, or its bytes): for arithmetic SEAL does not bind."""
    blob = obj if isinstance(obj, bytes) else seal_to_bytes(obj, what)
    _magic, _hsize, major, minor, compr, _res, _size = _SEAL_HEADER.unpack_from(blob)
    payload = blob[_SEAL_HEADER.size :]  # made here: no size bound needed
    body = zstandard.ZstdDecompressor().decompressobj().decompress(payload) if compr == 2 else payload
    members = _CT_MEMBERS.unpack_from(body)
    _pid, _ntt, size, n, primes, _scale, _corr = members
    at = _CT_MEMBERS.size + _SEAL_HEADER.size
    (count,) = _ARRAY_COUNT.unpack_from(body, at)
    if count != size * n * primes:
        raise CryptoError(f"{what} is not a full-form ciphertext ({count} coefficients)")
    polys = np.frombuffer(body, dtype="<u8", count=count, offset=at + _ARRAY_COUNT.size)
    return (major, minor), members, polys.reshape(size, primes, n).copy()


def polys_blob(version: tuple[int, int], members: tuple[Any, ...], polys: np.ndarray) -> bytes:
    """An uncompressed SEAL ciphertext with these members and polynomials (see :func:`ciphertext_polys`)."""
    data = np.ascontiguousarray(polys, dtype="<u8").tobytes()
    array = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, 0, 0,
                              _SEAL_HEADER.size + _ARRAY_COUNT.size + len(data))
    body = _CT_MEMBERS.pack(*members) + array + _ARRAY_COUNT.pack(len(data) // 8) + data
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, 0, 0, _SEAL_HEADER.size + len(body)) + body


def load_seal(obj: Any, seal_context: Any, data: bytes) -> Any:
    """``obj.load(seal_context, ...)`` from bytes (errors left to the caller's tenseal_errors)."""
    _seal_load(lambda p: obj.load(seal_context, p), data)
    return obj


def load_tenseal_context(blob: bytes, n_threads: int | None, what: str) -> ts.Context:
    """``ts.context_from`` with errors wrapped (bytes already validated by the caller)."""
    with tenseal_errors(f"loading {what}"):
        return ts.context_from(blob, n_threads=n_threads)
