"""The projection spec survives the wire exactly, bias flags included."""

from __future__ import annotations

import pytest

from tip_fed.core.projection import LayerProjection, ProjectionSpec
from tip_fed.errors import ProtocolError
from tip_fed.protocol.offer import spec_from_pb, spec_to_pb
from tip_fed.wire.tip.v1 import valuation_pb2 as pb


def test_spec_round_trips_through_protobuf_bytes() -> None:
    # Prepare: one layer with its bias column, one without.
    spec = ProjectionSpec(
        layers=(LayerProjection("0", 10, 16, 11, 16, True), LayerProjection("2", 16, 2, 8, 2, False)),
        seed=4,
        kind="gaussian",
    )
    # Execute
    wire = pb.ProjectionSpec.FromString(spec_to_pb(spec).SerializeToString())
    again = spec_from_pb(wire)
    # Assert: same spec, same fingerprint (the seller regenerates the same matrices).
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert [layer.bias for layer in wire.layers] == [True, False]


def test_bias_flag_that_breaks_the_ranks_is_refused() -> None:
    msg = spec_to_pb(ProjectionSpec(layers=(LayerProjection("0", 10, 16, 11, 16, True),), seed=0))
    msg.layers[0].bias = False  # rank_in 11 no longer fits in_features 10
    with pytest.raises(ProtocolError, match="rank_in"):
        spec_from_pb(msg)
