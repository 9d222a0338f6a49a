"""Every user-facing failure of tip_fed is a :class:`TipError`.

Messages say what was wrong and how to fix it. Callers can catch ``TipError`` to handle
all of them, or a subclass to handle one kind.
"""

from __future__ import annotations


class TipError(Exception):
    """Root of all tip_fed errors."""


class ConfigError(TipError, ValueError):
    """A setting is unknown, has the wrong type, or conflicts with another."""


class DataError(TipError, ValueError):
    """Input data (arrays, batches, files) has the wrong shape, type or content."""


class ModelError(TipError):
    """A model cannot be used: unsupported layers, unknown architecture, bad weights."""


class CryptoError(TipError):
    """A homomorphic-encryption operation failed or got unusable input."""


class InsecureParametersError(CryptoError):
    """CKKS parameters give less than the required security level."""


class CodecError(CryptoError):
    """Serialized keys or ciphertexts are empty, truncated, garbage, or for other parameters."""


class UnseededKeyError(CodecError):
    """A public key arrived with its random half written out instead of expanded from a seed."""


class ProtocolError(TipError):
    """A protocol message is malformed, out of order, or inconsistent with the session."""


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version."""


class FingerprintMismatchError(ProtocolError):
    """The model weights do not match the fingerprint they were announced with."""


class SessionError(ProtocolError):
    """A message belongs to another session, replays one, or arrives after settlement."""


class SellerIdentityError(ProtocolError):
    """A reply claims a seller id other than the one its authenticated peer holds."""


class BudgetExceededError(ProtocolError):
    """A seller refused a query because the session's query budget is spent."""


class SellerUnavailableError(TipError):
    """A seller could not be reached, did not answer in time, or refused a call over the network."""


class ModelNotHeldError(ProtocolError):
    """An Offer referenced a model by fingerprint that the seller does not hold: send it with its weights."""

    #: First word of the message, so a buyer recognises the refusal across any carrier (gRPC details,
    #: Flower error replies) and resends the same Offer with the weights.
    MARKER = "model-not-held"

    def __init__(self, seller_id: str, fingerprint: str) -> None:
        super().__init__(
            f"{self.MARKER}: seller {seller_id} holds no model with fingerprint {fingerprint[:16]}…; send the same "
            "offer with its weights (value_sellers and the Flower buyer do this by themselves)"
        )
        self.fingerprint = fingerprint
