"""Plaintext math of tip_fed: projections, projected gradients, preconditioners, scores.

Pure torch/numpy; no I/O, no encryption, no transport. Everything an encrypted path computes
is checked against :mod:`tip_fed.core.influence`.
"""

from tip_fed.core.gradients import (
    KfacStats,
    kfac_statistics,
    projected_grads,
    projected_grads_batched,
    projected_grads_with_kfac,
)
from tip_fed.core.influence import clip_rows, query_vector, scores, seller_total
from tip_fed.core.precondition import Preconditioner, fit_preconditioner
from tip_fed.core.projection import (
    LayerProjection,
    ProjectionSpec,
    find_projectable_layers,
    projection_matrices,
)
from tip_fed.core.tasks import (
    CausalLMTask,
    ClassificationTask,
    SequenceClassificationTask,
    Task,
    batch_size,
    get_task,
)

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "KfacStats",
    "LayerProjection",
    "Preconditioner",
    "ProjectionSpec",
    "SequenceClassificationTask",
    "Task",
    "batch_size",
    "clip_rows",
    "find_projectable_layers",
    "fit_preconditioner",
    "get_task",
    "kfac_statistics",
    "projected_grads",
    "projected_grads_batched",
    "projected_grads_with_kfac",
    "projection_matrices",
    "query_vector",
    "scores",
    "seller_total",
]
