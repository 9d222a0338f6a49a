"""The Offer as the protocol reads it: decoded from tip.v1 bytes once, every field validated, typed.

This module is the Offer's wire boundary: its fields' protobuf forms (projection spec, CKKS
parameters, packing layout) are converted here and nowhere else.

A seller runs :func:`decode_offer` at the wire boundary and then works only with the :class:`Offer`
it returns: the projection spec rebuilt, the CKKS parameters checked for security (once: through
the packing plan, whose parameters are checked when it is made), the plan re-derived from them, the
noise request checked and the input format parsed. Nothing after decoding parses or re-checks the Offer,
so there is one place where a hostile Offer is refused for its shape. The buyer builds the same
:class:`Offer` and :func:`encode_offer` turns it into the bytes every seller receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tip_fed.config import DISCLOSURES
from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.crypto.params import HEParams, PackingPlan
from tip_fed.errors import InsecureParametersError, ProtocolError, TipError
from tip_fed.protocol.formats import InputFormat, format_digest, format_from_pb
from tip_fed.protocol.messages import MAX_OFFER_BYTES, PROTOCOL_VERSION, parse_message
from tip_fed.protocol.resources import ResourceBudget, ResourceLimitError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

__all__ = [
    "MAX_MODEL_CONFIG_BYTES",
    "Offer",
    "decode_offer",
    "encode_offer",
    "params_to_pb",
    "plan_from_pb",
    "plan_to_pb",
    "spec_from_pb",
    "spec_to_pb",
]

#: A model's builder config (layer sizes, GPT-2 settings) is a few KiB; a longer one could ask the
#: seller to build millions of modules before their weights are compared with the shipped ones.
MAX_MODEL_CONFIG_BYTES = 64 << 10
#: Config name (the allowed values of protocol.disclosure, in order) -> wire value.
DISCLOSURE_NAMES = dict(zip(DISCLOSURES, (pb.DISCLOSURE_AGGREGATE, pb.DISCLOSURE_PER_SAMPLE), strict=True))
PLAN_FIELDS = ("dim", "padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block")
#: Packing layout name: BSGS with the baby steps sent as rotated query copies (see tip_fed.crypto.packing).
PACKING_KIND = "bsgs-copies"


@dataclass(frozen=True)
class Offer:
    """One session's Offer, validated.

    ``model`` stays the shipped payload (architecture, builder config, safetensors weights or only
    a fingerprint): the seller's model cache verifies and loads it. ``plan.params`` are the CKKS
    parameters, already checked for >= 128-bit security. ``message_bytes`` is the size on the wire.
    """

    session_id: str
    model: pb.ModelPayload
    task: str
    spec: ProjectionSpec
    plan: PackingPlan
    public_context: bytes
    query: tuple[bytes, ...]
    query_norm: float
    disclosure: str
    grad_norm_bound: float
    query_budget: int
    max_samples: int
    # the differential-privacy noise the buyer asks for (epsilon 0: none); a seller may add more, never less
    dp_epsilon: float
    dp_delta: float
    input_format: InputFormat | None = None
    input_digest: bytes | None = None
    message_bytes: int = 0

    @property
    def params(self) -> HEParams:
        """The session's CKKS parameters (checked)."""
        return self.plan.params

    @property
    def references_model(self) -> bool:
        """True when the model is named by fingerprint only: the seller answers with one it holds."""
        return not self.model.weights

    @property
    def per_sample(self) -> bool:
        """True when the buyer asks for one score per record, not only the seller's total."""
        return self.disclosure == "per-sample"


def decode_offer(data: bytes, budget: ResourceBudget | None = None) -> Offer:
    """Parse and validate an Offer; ProtocolError (or a subclass) naming the first bad field.

    ``budget``: the seller's resource limits that bound decoding itself (the number of projection
    layers rebuilt here); what answering would cost is judged later, from the decoded Offer.
    """
    offer: pb.Offer = parse_message(pb.Offer, data, MAX_OFFER_BYTES, "offer")
    _check_model(offer.model if offer.HasField("model") else None)
    layers = offer.projection.layers
    if not layers:
        raise ProtocolError("the offer's projection spec has no layers")
    limit = (budget or ResourceBudget()).max_layers
    if len(layers) > limit:
        raise ResourceLimitError(f"the offer's projection spec lists {len(layers)} layers, above {limit}", "max_layers")
    if not offer.public_context:
        raise ProtocolError("the offer carries no public HE context")
    copies = offer.packing.chunks * offer.packing.baby
    if len(offer.query) != copies or not offer.query:
        raise ProtocolError(
            f"the offer carries {len(offer.query)} query ciphertexts but its packing needs {copies} "
            f"({offer.packing.chunks} chunk(s) x {offer.packing.baby} rotated copies)"
        )
    disclosure = next((name for name, value in DISCLOSURE_NAMES.items() if value == offer.disclosure), None)
    if disclosure is None:
        raise ProtocolError(f"unknown disclosure policy {offer.disclosure}; expected aggregate or per-sample")
    if not (math.isfinite(offer.grad_norm_bound) and offer.grad_norm_bound > 0):
        raise ProtocolError(f"the offer's gradient-norm bound {offer.grad_norm_bound} must be finite and > 0")
    if not 0 < offer.query_norm <= 2.0**12:
        raise ProtocolError(f"the offer's query norm {offer.query_norm} is outside (0, 4096]")
    if offer.query_budget < 1:
        raise ProtocolError("the offer's query budget must be >= 1")
    if offer.max_samples < 1:
        raise ProtocolError("the offer's max_samples must be >= 1")
    if not (math.isfinite(offer.dp_epsilon) and offer.dp_epsilon >= 0):
        raise ProtocolError(f"the offer's dp_epsilon {offer.dp_epsilon} must be finite and >= 0 (0 = no noise)")
    if offer.dp_epsilon > 0 and not 0 < offer.dp_delta < 1:
        raise ProtocolError(f"the offer's dp_delta {offer.dp_delta} must be in (0, 1) when noise is asked for")
    # the one security check of the CKKS parameters: the plan checks them as it is rebuilt
    plan = plan_from_pb(offer.packing, offer.he)
    spec = spec_from_pb(offer.projection)
    if plan.dim != spec.dim:
        raise ProtocolError(f"the offer's packing is for dimension {plan.dim} but its projection has {spec.dim}")
    has_input = offer.HasField("input")
    return Offer(
        session_id=offer.session_id,
        model=offer.model,
        task=offer.task,
        spec=spec,
        plan=plan,
        public_context=bytes(offer.public_context),
        query=tuple(offer.query),
        query_norm=offer.query_norm,
        disclosure=disclosure,
        grad_norm_bound=offer.grad_norm_bound,
        query_budget=offer.query_budget,
        max_samples=offer.max_samples,
        dp_epsilon=offer.dp_epsilon,
        dp_delta=offer.dp_delta if offer.dp_epsilon > 0 else 0.0,
        # bounds checked, text decoded; the tokenizer itself is parsed only after costing
        input_format=format_from_pb(offer.input) if has_input else None,
        input_digest=format_digest(offer.input) if has_input else None,
        message_bytes=len(data),
    )


def _check_model(model: pb.ModelPayload | None) -> None:
    if model is None or not (model.weights or model.fingerprint):
        raise ProtocolError("the offer carries no model weights and no model reference (fingerprint)")
    if not model.weights and not model.architecture:
        raise ProtocolError("the offer references a model without naming its architecture")
    if len(model.config_json) > MAX_MODEL_CONFIG_BYTES:
        raise ProtocolError(
            f"the offer's model config is {len(model.config_json)} characters, above the "
            f"{MAX_MODEL_CONFIG_BYTES} a model description may take; describe the model with its builder's settings"
        )


def encode_offer(offer: Offer) -> bytes:
    """The tip.v1 bytes of ``offer`` (what the buyer sends to every seller)."""
    return pb.Offer(
        protocol_version=PROTOCOL_VERSION,
        session_id=offer.session_id,
        model=offer.model,
        projection=spec_to_pb(offer.spec),
        task=offer.task,
        he=params_to_pb(offer.params),
        packing=plan_to_pb(offer.plan),
        public_context=offer.public_context,
        query=list(offer.query),
        query_norm=offer.query_norm,
        disclosure=DISCLOSURE_NAMES[offer.disclosure],
        grad_norm_bound=offer.grad_norm_bound,
        query_budget=offer.query_budget,
        max_samples=offer.max_samples,
        dp_epsilon=offer.dp_epsilon,
        dp_delta=offer.dp_delta,
        input=None if offer.input_format is None else offer.input_format.to_pb(),
    ).SerializeToString()


# ---- the Offer's fields on the wire ------------------------------------------------------------
def spec_to_pb(spec: ProjectionSpec) -> pb.ProjectionSpec:
    """Projection spec as sent in the Offer (the matrices are regenerated, never sent)."""
    data = spec.to_dict()
    return pb.ProjectionSpec(
        seed=spec.seed,
        kind=spec.kind,
        generator=data["generator"],
        version=data["version"],
        layers=[
            pb.LayerProjection(
                name=layer.name, in_features=layer.in_features, out_features=layer.out_features,
                rank_in=layer.rank_in, rank_out=layer.rank_out, bias=layer.bias,
            )
            for layer in spec.layers
        ],
    )


def spec_from_pb(msg: pb.ProjectionSpec) -> ProjectionSpec:
    """Rebuild and validate a projection spec."""
    try:
        return ProjectionSpec.from_dict(
            {
                "version": msg.version,
                "generator": msg.generator,
                "seed": msg.seed,
                "kind": msg.kind,
                "layers": [_layer_dict(layer) for layer in msg.layers],
            }
        )
    except TipError as exc:
        raise ProtocolError(f"the offer's projection spec is invalid: {exc}") from exc


def _layer_dict(layer: LayerProjection | pb.LayerProjection) -> dict[str, object]:
    return {
        "name": layer.name, "in_features": layer.in_features, "out_features": layer.out_features,
        "rank_in": layer.rank_in, "rank_out": layer.rank_out, "bias": layer.bias,
    }


def params_to_pb(params: HEParams) -> pb.HEParameters:
    """CKKS parameters as sent in the Offer."""
    return pb.HEParameters(
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        global_scale_bits=params.global_scale_bits,
    )


def plan_to_pb(plan: PackingPlan) -> pb.Packing:
    """Packing layout as sent in the Offer (its parameters go in :func:`params_to_pb`)."""
    return pb.Packing(kind=PACKING_KIND, **{k: int(getattr(plan, k)) for k in PLAN_FIELDS})


def plan_from_pb(msg: pb.Packing, he: pb.HEParameters) -> PackingPlan:
    """Rebuild the packing layout for the Offer's CKKS parameters ``he``, checking the parameters
    (once: :meth:`PackingPlan.from_dict` runs the security check) and then the layout.

    InsecureParametersError for parameters below 128-bit security, ProtocolError for the rest."""
    if msg.kind != PACKING_KIND:
        raise ProtocolError(f"unknown packing kind {msg.kind!r}; this seller supports {PACKING_KIND!r}")
    data: dict[str, object] = {k: int(getattr(msg, k)) for k in PLAN_FIELDS}
    data["params"] = {
        "poly_modulus_degree": int(he.poly_modulus_degree),
        "coeff_mod_bit_sizes": [int(b) for b in he.coeff_mod_bit_sizes],
        "global_scale_bits": int(he.global_scale_bits),
    }
    try:
        return PackingPlan.from_dict(data)
    except InsecureParametersError:
        raise
    except TipError as exc:
        raise ProtocolError(f"the offer's CKKS parameters or packing layout are invalid: {exc}") from exc
