"""Conversions between protocol objects (projection spec, HE parameters, packing) and tip.v1 messages."""

from __future__ import annotations

from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.crypto.params import HEParams, PackingPlan
from tip_fed.errors import InsecureParametersError, ProtocolError, TipError
from tip_fed.wire.tip.v1 import valuation_pb2 as pb

PLAN_FIELDS = ("dim", "padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block")
#: Packing layout name: BSGS with the baby steps sent as rotated query copies (see tip_fed.crypto.packing).
PACKING_KIND = "bsgs-copies"


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
                "layers": [layer_dict(layer) for layer in msg.layers],
            }
        )
    except TipError as exc:
        raise ProtocolError(f"the offer's projection spec is invalid: {exc}") from exc


def layer_dict(layer: LayerProjection | pb.LayerProjection) -> dict[str, object]:
    """Plain dict of one layer projection."""
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
    """Packing layout as sent in the Offer."""
    d = plan.to_dict()
    return pb.Packing(kind=PACKING_KIND, **{k: int(d[k]) for k in PLAN_FIELDS})


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
