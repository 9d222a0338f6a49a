"""Models a seller already holds, keyed by fingerprint, so a buyer need not re-ship the weights.

An Offer may carry its model *by reference*: architecture, config and fingerprint, no weights
(:func:`strip_weights`). A seller answers it only with a model it holds under exactly that
architecture, config and fingerprint, that the same buyer (authenticated peer) uploaded to it
before, and it holds only models whose fingerprint it computed itself from the bytes it received
(:meth:`ModelCache.admit`). Every other reference (not held, held for another buyer, another
architecture or config) gets the same :class:`~tip_fed.errors.ModelNotHeldError` before anything
is spent, so the buyer sends the same Offer with its weights and learns nothing about what other
buyers uploaded, nor can use their models.

The cache is bounded in weight bytes (least recently used entries go first; an entry above the
bound is never held). With a directory it also keeps each model in one owner-only file, written
atomically under a file lock, with a sidecar listing its uploaders (as digests of their peer
identities, at most :data:`MAX_UPLOADERS`), and re-verifies a file's fingerprint whenever it is
read: a file that fails is deleted and the model is asked for again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from google.protobuf.message import DecodeError

from tip_fed.errors import (
    ConfigError,
    ModelNotHeldError,
    ProtocolError,
    TipError,
)
from tip_fed.files import write_private
from tip_fed.protocol.model import fingerprint
from tip_fed.protocol.resources import WeightsHeader, read_weights_header
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

log = logging.getLogger(__name__)

FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".model"
_PEERS = ".peers"
#: Uploaders remembered per model (the most recent); an older one must send its weights again.
MAX_UPLOADERS = 64


def uploader_id(peer: str | None) -> str:
    """A peer's digest as the cache records it (None: the identity all unauthenticated buyers share),
    so the cache files name no buyer."""
    return hashlib.sha256(b"anonymous" if peer is None else b"peer:" + peer.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class HeldModel:
    """A model whose fingerprint this seller computed from its bytes: what a reference resolves to."""

    architecture: str
    config_json: str
    fingerprint: str
    weights: bytes
    header: WeightsHeader

    @property
    def payload(self) -> pb.ModelPayload:
        """The full model payload, as if the buyer had shipped it."""
        return pb.ModelPayload(architecture=self.architecture, config_json=self.config_json,
                               weights=self.weights, fingerprint=self.fingerprint)


def is_reference(payload: pb.ModelPayload) -> bool:
    """True for a model named by fingerprint without its weights."""
    return not payload.weights


def strip_weights(offer_bytes: bytes) -> bytes:
    """The same Offer (session, keys, query, everything) with the model by reference: no weights."""
    offer = pb.Offer()
    try:
        offer.ParseFromString(bytes(offer_bytes))
    except DecodeError as exc:
        raise ProtocolError(
            f"the offer to strip is not a valid tip.v1 Offer: {exc}; pass the bytes of Buyer.offer()"
        ) from exc
    offer.model.ClearField("weights")
    return offer.SerializeToString()


def verified(payload: pb.ModelPayload) -> HeldModel | None:
    """A HeldModel when ``payload``'s weights hash to its fingerprint and have a valid header, else None."""
    if (
        not payload.weights
        or fingerprint(payload.architecture, payload.config_json, payload.weights) != payload.fingerprint
    ):
        return None
    try:
        header = read_weights_header(payload.weights)
    except TipError:
        return None
    return HeldModel(payload.architecture, payload.config_json, payload.fingerprint, bytes(payload.weights), header)


class ModelCache:
    """Byte-bounded LRU of verified models, optionally persisted in ``directory``.

    Parameters
    ----------
    max_bytes:
        Most weight bytes held (in memory, and on disk when ``directory`` is set); 0 holds nothing,
        so every reference is answered with ModelNotHeldError.
    directory:
        Optional folder for one file per model (``<fingerprint>.model``, mode 0600), shared safely
        by seller processes; files are re-verified whenever read.
    """

    def __init__(self, max_bytes: int, directory: str | Path | None = None) -> None:
        if max_bytes < 0:
            raise ConfigError(f"the model cache bound must be >= 0 bytes, got {max_bytes}; 0 turns the cache off")
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory else None
        self._entries: OrderedDict[str, HeldModel] = OrderedDict()
        self._uploaders: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._file_lock: FileLock | None = None
        if self.directory is not None and max_bytes > 0:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the model cache directory {self.directory}: {exc.strerror}; "
                    "pass a writable --model-cache-dir"
                ) from None
            self._file_lock = FileLock(str(self.directory / ".lock"), timeout=60)

    @property
    def nbytes(self) -> int:
        """Weight bytes held in memory now."""
        with self._lock:
            return sum(len(e.weights) for e in self._entries.values())

    def fingerprints(self) -> list[str]:
        """Fingerprints held in memory, least recently used first."""
        with self._lock:
            return list(self._entries)

    def resolve(self, payload: pb.ModelPayload, seller_id: str, peer: str | None = None) -> HeldModel | None:
        """What a reference names (None for a payload that ships its weights).

        ModelNotHeldError, identical in every case, unless ``peer`` itself uploaded a model with
        exactly that fingerprint, architecture and config: a reference is no oracle for what other
        buyers uploaded, and never lends one buyer's model to another (the buyer sends its weights).
        """
        if not is_reference(payload):
            return None
        if not FINGERPRINT.match(payload.fingerprint):
            raise ProtocolError(
                f"the offer references a model by fingerprint {payload.fingerprint[:70]!r}; "
                "expected 64 hex characters (sha256)"
            )
        held = self.get(payload.fingerprint)
        if (
            held is None
            or uploader_id(peer) not in self.uploaders(payload.fingerprint)
            or (held.architecture, held.config_json) != (payload.architecture, payload.config_json)
        ):
            raise ModelNotHeldError(seller_id, payload.fingerprint)
        return held

    def uploaders(self, fp: str) -> list[str]:
        """Digests (:func:`uploader_id`) of the peers that uploaded the model under ``fp``, oldest first."""
        with self._lock:
            return list(self._uploaders.get(fp, ()))

    def get(self, fp: str) -> HeldModel | None:
        """The verified model under ``fp`` (memory first, then the directory), marked recently used."""
        with self._lock:
            held = self._entries.get(fp)
            if held is not None:
                self._entries.move_to_end(fp)
                self._touch(fp)
                return held
            held = self._read(fp)
            if held is not None:
                self._remember(held)
            return held

    def admit(self, payload: pb.ModelPayload, peer: str | None = None, checked: WeightsHeader | None = None) -> bool:
        """Hold ``payload``'s model for ``peer`` (who may then reference it) if its weights hash to
        its fingerprint and it fit the bound (``checked``: the weights header of a payload whose
        fingerprint the caller has just verified, as building the model does, so it is not hashed twice)."""
        if not payload.weights or len(payload.weights) > self.max_bytes:
            return False
        held = verified(payload) if checked is None else HeldModel(
            payload.architecture, payload.config_json, payload.fingerprint, bytes(payload.weights), checked)
        if held is None:
            return False
        who = uploader_id(peer)
        with self._lock:
            if held.fingerprint not in self._entries:
                self._remember(held)
            else:
                self._entries.move_to_end(held.fingerprint)
            if held.fingerprint not in self._entries:
                return True  # evicted at once (another process's files may still name it)
            peers = [p for p in self._uploaders.get(held.fingerprint, []) if p != who] + [who]
            self._uploaders[held.fingerprint] = peers[-MAX_UPLOADERS:]
            self._write(held)
        return True

    # -- internals (called with self._lock held) --------------------------------------------------

    def _remember(self, held: HeldModel) -> None:
        self._entries[held.fingerprint] = held
        total = sum(len(e.weights) for e in self._entries.values())
        while total > self.max_bytes and self._entries:
            fp, old = self._entries.popitem(last=False)
            self._uploaders.pop(fp, None)
            total -= len(old.weights)
            self._unlink(fp)

    def _path(self, fp: str) -> Path | None:
        """The model's file, or None without persistence."""
        return None if self._file_lock is None or self.directory is None else self.directory / f"{fp}{_SUFFIX}"

    def _write(self, held: HeldModel) -> None:
        """Persist the model (once) and its uploaders, merged with those another process recorded."""
        path = self._path(held.fingerprint)
        if path is None or self._file_lock is None or held.fingerprint not in self._entries:
            return
        with self._file_lock:
            if path.is_file():
                os.utime(path)
            else:
                write_private(path, held.payload.SerializeToString())
            on_disk = self._read_peers(path)
            mine = self._uploaders.get(held.fingerprint, [])
            merged = ([p for p in on_disk if p not in mine] + mine)[-MAX_UPLOADERS:]
            self._uploaders[held.fingerprint] = merged
            write_private(path.with_suffix(_PEERS), json.dumps(merged).encode())
            self._trim_directory(path)

    @staticmethod
    def _read_peers(model_path: Path) -> list[str]:
        """The uploader digests recorded next to a model file ([] when missing or unreadable)."""
        try:
            peers = json.loads(model_path.with_suffix(_PEERS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(peers, list):
            return []
        return [p for p in peers if isinstance(p, str) and FINGERPRINT.match(p)][-MAX_UPLOADERS:]

    def _trim_directory(self, keep: Path) -> None:
        """Delete the least recently used files until the directory fits the bound."""
        files = []
        for p in keep.parent.glob(f"*{_SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                p.with_suffix(_PEERS).unlink(missing_ok=True)
                total -= size

    def _read(self, fp: str) -> HeldModel | None:
        path = self._path(fp)
        if path is None or self._file_lock is None or not path.is_file():
            return None
        with self._file_lock:
            try:
                data = path.read_bytes()
            except OSError:
                return None
            payload = pb.ModelPayload()
            try:
                payload.ParseFromString(data)
            except DecodeError:
                payload = pb.ModelPayload()
            held = verified(payload) if payload.fingerprint == fp else None
            if held is None:
                log.warning(
                    "model cache file %s does not hash to its fingerprint; deleted, the buyer will be asked "
                    "for the weights again",
                    path,
                )
                path.unlink(missing_ok=True)
                path.with_suffix(_PEERS).unlink(missing_ok=True)
                return None
            os.utime(path)
            self._uploaders[fp] = self._read_peers(path)
            return held

    def _touch(self, fp: str) -> None:
        path = self._path(fp)
        if path is not None:
            try:
                os.utime(path)
            except OSError:
                pass  # evicted by another process sharing the directory: memory still holds it

    def _unlink(self, fp: str) -> None:
        path = self._path(fp)
        if path is not None and self._file_lock is not None:
            with self._file_lock:
                path.unlink(missing_ok=True)
                path.with_suffix(_PEERS).unlink(missing_ok=True)
