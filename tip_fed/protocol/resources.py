"""Costing an Offer before anything is allocated, against the seller's resource budget.

An Offer that passes every structural check can still ask a long-lived seller for gigabytes
(rank-F projections over wide layers, a huge projected dimension, narrow weight dtypes that widen
when loaded, heavy CKKS parameters). :func:`cost_offer` reads only the decoded Offer's own fields
(layer shapes and ranks, the safetensors header, N and the primes, the packing) plus the seller's
sample count, and estimates the bytes and rough single-core seconds of every later step;
it refuses one over the seller's per-Offer limits with a :class:`ResourceLimitError` naming the
exceeded limit and the setting that raises it. Every step here is linear in the Offer's size; nothing it sizes is built.
:class:`InFlight` bounds what all Offers being answered at once may cost.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tip_fed.config import SellerBudgetConfig
from tip_fed.core.projection import ProjectionSpec
from tip_fed.crypto.costs import seller_cost
from tip_fed.errors import ModelError, ProtocolError
from tip_fed.protocol.formats import InputFormat, TableFormat, TextFormat

if TYPE_CHECKING:  # the Offer is decoded (bounded by the layer limit) before it is costed
    from tip_fed.protocol.offer import Offer

__all__ = [
    "InFlight",
    "OfferCost",
    "PeerSlots",
    "ResourceBudget",
    "ResourceLimitError",
    "WeightsHeader",
    "cost_offer",
    "max_offer_bytes",
    "read_weights_header",
]

MiB = 1 << 20
#: A seller's budget is a config section (``[seller-budget]``); the name says what it is here.
ResourceBudget = SellerBudgetConfig
#: Float dtypes a model may ship, and their bytes per element.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
#: Copies of the Offer's bytes a seller holds while decoding it (transport buffer, request bytes,
#: parsed request, re-serialised offer, parsed offer).
MESSAGE_COPIES = 5
#: Copies of the n x k gradient matrix alive at the peak (per-batch list, concatenation, float64
#: cast, clipped copy, scaled rows, stacked score rows).
GRADIENT_COPIES = 6
#: Python objects per shipped tensor (module, parameter, state-dict entries), bytes.
_TENSOR_BYTES = 4 << 10
#: Memory of a parsed JSON header per byte of it.
HEADER_PARSE_FACTOR = 16
#: Per-layer bookkeeping (hooks, Python objects, spec entries), bytes and seconds.
_LAYER_BYTES = 16 << 10
_LAYER_S = 1e-4
#: Rough single-core throughputs used for the work estimate.
_FLOPS = 2e9
_MATRIX_ENTRIES_S = 5e7
_KEY_BYTES_S = 2e8
_TOKENIZE_S = 1e-6
_SETTINGS = {
    "offer_memory_mb": ("seller-budget.offer-memory-mb", "--offer-memory-mb"),
    "in_flight_memory_mb": ("seller-budget.in-flight-memory-mb", "--in-flight-memory-mb"),
    "max_sessions": ("seller-budget.max-sessions", "--max-sessions"),
    "max_offers_per_peer": ("seller-budget.max-offers-per-peer", "--max-offers-per-peer"),
    "max_calls": ("seller-budget.max-calls", "--max-calls"),
    "he_key_memory_mb": ("seller-budget.he-key-memory-mb", "--he-key-memory-mb"),
    "projection_memory_mb": ("seller-budget.projection-memory-mb", "--projection-memory-mb"),
    "max_layers": ("seller-budget.max-layers", "--max-layers"),
    "offer_work_s": ("seller-budget.offer-work-s", "--offer-work-s"),
    "kept_sessions": ("seller-budget.kept-sessions", "--kept-sessions"),
}


class ResourceLimitError(ProtocolError):
    """An Offer (or the load on the seller) would exceed the seller's resource budget."""

    def __init__(self, what: str, limit: str) -> None:
        key, flag = _SETTINGS[limit]
        super().__init__(
            f"{what}; this seller's limit is {key} ('tip-fed seller serve {flag}'): raise it if the "
            "machine can afford it, or ask the buyer for a smaller offer (lower ranks, fewer layers, "
            "smaller CKKS parameters)"
        )
        self.limit = limit


@dataclass(frozen=True)
class WeightsHeader:
    """What a safetensors header announces: element count and stored bytes of float tensors."""

    n_elements: int
    stored_bytes: int
    float64: bool
    n_tensors: int = 0
    header_bytes: int = 0


def read_weights_header(weights: bytes, max_header_bytes: int | None = None) -> WeightsHeader:
    """Parse only the safetensors header of the shipped weights (linear in its length).

    Non-float dtypes are refused (a uint8 blob would widen 4x when loaded into a float model);
    every tensor's byte range must match its shape times its dtype size and lie in the buffer.
    A header above ``max_header_bytes`` is refused before it is parsed (parsing holds about
    :data:`HEADER_PARSE_FACTOR` times its size).
    """
    if len(weights) < 8:
        raise ModelError("model weights are not valid safetensors: shorter than the 8-byte header length")
    size = int.from_bytes(weights[:8], "little")
    if size > len(weights) - 8:
        raise ModelError(
            f"model weights are not valid safetensors: header of {size} bytes in a {len(weights)}-byte blob"
        )
    if max_header_bytes is not None and size > max_header_bytes:
        raise ResourceLimitError(
            f"the offer's weights header is {size} bytes; parsing it would take about "
            f"{size * HEADER_PARSE_FACTOR / MiB:.0f} MiB",
            "offer_memory_mb",
        )
    try:
        header = json.loads(bytes(weights[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model weights are not valid safetensors: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError("model weights are not valid safetensors: header is not a JSON object")
    data_bytes = len(weights) - 8 - size
    n_elements = stored = tensors = 0
    dtypes: list[str] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ModelError(f"model weights: tensor {name[:60]!r} has no dtype/shape entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"model weights: tensor {name[:60]!r} has dtype {str(dtype)[:20]!r}; a model ships float "
                f"weights only ({', '.join(FLOAT_DTYPES)}); cast it to float32 before encoding it"
            )
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ModelError(f"model weights: tensor {name[:60]!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelError(f"model weights: tensor {name[:60]!r} has invalid data offsets")
        count = math.prod(shape)
        nbytes = count * FLOAT_DTYPES[dtype]
        if not 0 <= offsets[0] <= offsets[1] <= data_bytes or offsets[1] - offsets[0] != nbytes:
            raise ModelError(
                f"model weights: tensor {name[:60]!r} announces {nbytes} bytes ({dtype} {shape}) but its "
                f"data range {offsets} does not fit the {data_bytes}-byte buffer"
            )
        n_elements += count
        stored += nbytes
        tensors += 1
        dtypes.append(dtype)
    return WeightsHeader(n_elements, stored, bool(dtypes) and dtypes[0] == "F64", tensors, size)


@dataclass(frozen=True)
class OfferCost:
    """Estimated peak bytes of each step of answering one Offer, and rough single-core seconds."""

    message_bytes: int
    projection_bytes: int
    model_bytes: int
    gradient_bytes: int
    batch_bytes: int
    he_key_bytes: int
    query_bytes: int
    scoring_bytes: int
    work_s: float
    layers: int
    dim: int
    input_bytes: int = 0  # raw records encoded by the Offer's input format (parsed tokenizer, tensors)
    weights: WeightsHeader | None = None  # the model's weights header, read once here: building reuses it

    @property
    def total_bytes(self) -> int:
        """Everything at once: an upper estimate of the Offer's peak memory."""
        return (
            self.message_bytes
            + self.projection_bytes
            + self.model_bytes
            + self.gradient_bytes
            + self.batch_bytes
            + self.he_key_bytes
            + self.query_bytes
            + self.scoring_bytes
            + self.input_bytes
        )

    def breakdown(self) -> str:
        """``projection 1024 MiB, gradients 3 MiB, ...``: the parts above 1 MiB, largest first."""
        parts = {k.removesuffix("_bytes"): v for k, v in asdict(self).items() if k.endswith("_bytes")}
        big = sorted(((v, k) for k, v in parts.items() if v >= MiB), reverse=True)
        return ", ".join(f"{k} {v / MiB:.0f} MiB" for v, k in big) or "all parts under 1 MiB"


def _layer_costs(spec: ProjectionSpec) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(projection matrix entries, per-layer shapes) of a decoded spec, in one pass."""
    shapes = [(layer.rank_in, layer.rank_out, layer.in_features, layer.out_features) for layer in spec.layers]
    entries = sum(r_in * f_in + r_out * f_out for r_in, r_out, f_in, f_out in shapes)
    return entries, shapes


def cost_offer(
    offer: Offer,
    n_samples: int,
    *,
    batch_size: int,
    tokens_per_sample: int = 1,
    budget: ResourceBudget | None = None,
    held: WeightsHeader | None = None,
) -> OfferCost:
    """Estimate what answering ``offer`` (decoded and validated) will cost a seller holding ``n_samples`` records.

    Reads the Offer's fields only; raises ModelError/ProtocolError for what cannot be costed
    (non-float weights, a public context larger than its plan's keys) and ResourceLimitError for
    what exceeds ``budget``'s per-Offer limits. ``held`` is the header of the weights the seller already holds for an
    Offer that references its model without shipping it (see :mod:`tip_fed.protocol.model_cache`).
    """
    budget = budget or ResourceBudget()
    entries, shapes = _layer_costs(offer.spec)
    dim = offer.spec.dim
    weights = (
        held
        if held is not None
        else read_weights_header(offer.model.weights, budget.offer_memory_mb * MiB // HEADER_PARSE_FACTOR)
    )
    elem = 8 if weights.float64 else 4
    # The float64 originals stay cached; each batch converts a copy to the model's dtype.
    projection = entries * (8 + elem)
    model = (
        weights.stored_bytes
        + weights.n_elements * elem
        + weights.n_tensors * _TENSOR_BYTES
        + weights.header_bytes * HEADER_PARSE_FACTOR
    )
    gradients = GRADIENT_COPIES * n_samples * dim * 8
    tokens_per_sample, inputs = _input_cost(offer.input_format, n_samples, tokens_per_sample)
    b, t = max(1, min(batch_size, n_samples)), max(1, tokens_per_sample)
    # Per batch and layer: the input and output kept for backward and the output gradient, the
    # projected activations and gradients, the float64 per-sample block and its running sum.
    batch = (
        sum(
            b * t * (2 * (f_in + f_out) + 2 * (r_in + r_out)) * elem + 2 * b * r_in * r_out * 8
            for r_in, r_out, f_in, f_out in shapes
        )
        + len(shapes) * _LAYER_BYTES
    )
    plan = offer.plan
    he = seller_cost(plan, n_samples + 1)  # memory and seconds of the CKKS work, in one estimate
    if len(offer.public_context) > he.keys + MiB:
        # Seeded, compressed keys are smaller than in memory: a larger blob holds keys the plan never uses.
        raise ProtocolError(
            f"the offer's public context is {len(offer.public_context)} bytes, more than the "
            f"{len(plan.galois_steps)} Galois key(s) its packing needs can take ({he.keys} bytes expanded); "
            "send SessionKeys.public_context_bytes() for this plan"
        )
    he_keys = he.context + he.keys
    query = len(offer.query) * he.ciphertext
    scoring = (plan.baby + 8) * he.ciphertext + (n_samples + 1) * dim * 8
    flops = 6.0 * weights.n_elements * n_samples * t + 4.0 * n_samples * t * sum(
        r_in * f_in + r_out * f_out + r_in * r_out for r_in, r_out, f_in, f_out in shapes
    )
    work = (
        flops / _FLOPS
        + entries / _MATRIX_ENTRIES_S
        + he_keys / _KEY_BYTES_S
        + he.seconds
        + len(shapes) * _LAYER_S
    )
    cost = OfferCost(
        MESSAGE_COPIES * offer.message_bytes,
        projection,
        model,
        gradients,
        batch,
        he_keys,
        query,
        scoring,
        work + n_samples * t * _TOKENIZE_S,
        len(shapes),
        dim,
        inputs,
        weights,
    )
    _check_cost(cost, budget)
    return cost


def _input_cost(fmt: InputFormat | None, n_samples: int, tokens_per_sample: int) -> tuple[int, int]:
    """(tokens per record, bytes) of encoding raw records with the Offer's input format: text is
    costed at its max_length whatever the records hold, before anything is tokenized."""
    if isinstance(fmt, TextFormat):
        t = max(tokens_per_sample, fmt.max_length)
        # parsed tokenizer, token lists, ids + mask (+ labels) tensors and their batch slices
        return t, len(fmt.tokenizer_json) * HEADER_PARSE_FACTOR + n_samples * (t * 3 * 8 + 8)
    if isinstance(fmt, TableFormat):
        return tokens_per_sample, n_samples * (len(fmt.features) + 1) * 3 * 8
    return tokens_per_sample, 0


def _check_cost(cost: OfferCost, budget: ResourceBudget) -> None:
    """Refuse an Offer whose estimated cost exceeds the per-Offer limits of ``budget``."""
    if cost.he_key_bytes > budget.he_key_memory_mb * MiB:
        raise ResourceLimitError(
            f"the offer's CKKS context and keys would take about {cost.he_key_bytes / MiB:.0f} MiB, above "
            f"{budget.he_key_memory_mb} MiB",
            "he_key_memory_mb",
        )
    if cost.projection_bytes > budget.projection_memory_mb * MiB:
        raise ResourceLimitError(
            f"the offer's projection matrices would take about {cost.projection_bytes / MiB:.0f} MiB "
            f"(rank x features summed over {cost.layers} layers), above {budget.projection_memory_mb} MiB",
            "projection_memory_mb",
        )
    if cost.total_bytes > budget.offer_memory_mb * MiB:
        raise ResourceLimitError(
            f"the offer would take about {cost.total_bytes / MiB:.0f} MiB ({cost.breakdown()}), above "
            f"{budget.offer_memory_mb} MiB",
            "offer_memory_mb",
        )
    if cost.work_s > budget.offer_work_s:
        raise ResourceLimitError(
            f"the offer would take about {cost.work_s:.0f} s of work on one core, above {budget.offer_work_s:.0f} s",
            "offer_work_s",
        )


def max_offer_bytes(budget: ResourceBudget) -> int:
    """Largest Offer message that could pass :func:`cost_offer`: its bytes are held
    :data:`MESSAGE_COPIES` times, and weights (most of a large Offer) are held once more as
    loaded tensors. gRPC's own limit is just under 2 GiB."""
    return min((1 << 31) - 1, budget.offer_memory_mb * MiB // (MESSAGE_COPIES + 1))


class InFlight:
    """Memory reserved by the Offers being answered now, and how many there are.

    At most ``max_sessions`` Offers hold a reservation at once; another waits for a slot (the
    callers are bounded: a service's threads, see :func:`tip_fed.grpc.server.start_server`). A
    reservation that would pass ``in_flight_memory_mb`` in total is refused, never queued, so a
    flood of costly Offers cannot pile up memory on a seller.
    """

    def __init__(self, budget: ResourceBudget) -> None:
        self.budget = budget
        self._cond = threading.Condition()
        self.sessions = 0
        self.bytes = 0

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` and one session slot for the duration of the block."""
        with self._cond:
            self._cond.wait_for(lambda: self.sessions < self.budget.max_sessions)
            if self.bytes + nbytes > self.budget.in_flight_memory_mb * MiB:
                raise ResourceLimitError(
                    f"offers being answered already hold about {self.bytes / MiB:.0f} MiB and this one needs "
                    f"{nbytes / MiB:.0f} MiB more, above {self.budget.in_flight_memory_mb} MiB in all",
                    "in_flight_memory_mb",
                )
            self.sessions += 1
            self.bytes += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.sessions -= 1
                self.bytes -= nbytes
                self._cond.notify()


class PeerSlots:
    """Offers each authenticated buyer has in the seller at once (being read, queued or scored).

    Scoring runs one Offer at a time, so without a per-buyer bound one buyer holding a valid
    certificate keeps the queue full of valid, costly Offers and every other buyer waits behind
    all of them. A peer's Offer beyond ``max_offers_per_peer`` is refused at once, never queued:
    each buyer then waits behind at most the other buyers' few Offers, not one buyer's flood.
    """

    def __init__(self, budget: ResourceBudget) -> None:
        self.limit = budget.max_offers_per_peer
        self._lock = threading.Lock()
        self.held: dict[str, int] = {}

    def admit(self, peer: str) -> None:
        """Take one of ``peer``'s slots (give it back with :meth:`release`); ResourceLimitError if none is left."""
        with self._lock:
            n = self.held.get(peer, 0)
            if n >= self.limit:
                raise ResourceLimitError(
                    f"this buyer already has {n} offer(s) being answered by this seller, the most one buyer may "
                    f"have at once ({self.limit}); wait for the answer before sending another",
                    "max_offers_per_peer",
                )
            self.held[peer] = n + 1

    def release(self, peer: str) -> None:
        """Give back a slot taken by :meth:`admit`."""
        with self._lock:
            if self.held[peer] <= 1:
                del self.held[peer]
            else:
                self.held[peer] -= 1
