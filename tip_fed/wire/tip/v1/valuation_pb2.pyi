from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Disclosure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCLOSURE_UNSPECIFIED: _ClassVar[Disclosure]
    DISCLOSURE_AGGREGATE: _ClassVar[Disclosure]
    DISCLOSURE_PER_SAMPLE: _ClassVar[Disclosure]
DISCLOSURE_UNSPECIFIED: Disclosure
DISCLOSURE_AGGREGATE: Disclosure
DISCLOSURE_PER_SAMPLE: Disclosure

class HEParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    global_scale_bits: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., global_scale_bits: _Optional[int] = ...) -> None: ...

class Packing(_message.Message):
    __slots__ = ("kind", "dim", "padded_dim", "chunks", "replication", "baby", "giant", "rows_per_block")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    PADDED_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    BABY_FIELD_NUMBER: _ClassVar[int]
    GIANT_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dim: int
    padded_dim: int
    chunks: int
    replication: int
    baby: int
    giant: int
    rows_per_block: int
    def __init__(self, kind: _Optional[str] = ..., dim: _Optional[int] = ..., padded_dim: _Optional[int] = ..., chunks: _Optional[int] = ..., replication: _Optional[int] = ..., baby: _Optional[int] = ..., giant: _Optional[int] = ..., rows_per_block: _Optional[int] = ...) -> None: ...

class LayerProjection(_message.Message):
    __slots__ = ("name", "in_features", "out_features", "rank_in", "rank_out", "bias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RANK_IN_FIELD_NUMBER: _ClassVar[int]
    RANK_OUT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    in_features: int
    out_features: int
    rank_in: int
    rank_out: int
    bias: bool
    def __init__(self, name: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., rank_in: _Optional[int] = ..., rank_out: _Optional[int] = ..., bias: _Optional[bool] = ...) -> None: ...

class ProjectionSpec(_message.Message):
    __slots__ = ("seed", "kind", "layers", "generator", "version")
    SEED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    seed: int
    kind: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerProjection]
    generator: str
    version: int
    def __init__(self, seed: _Optional[int] = ..., kind: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerProjection, _Mapping]]] = ..., generator: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelPayload(_message.Message):
    __slots__ = ("architecture", "config_json", "weights", "fingerprint")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    config_json: str
    weights: bytes
    fingerprint: str
    def __init__(self, architecture: _Optional[str] = ..., config_json: _Optional[str] = ..., weights: _Optional[bytes] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class TableInput(_message.Message):
    __slots__ = ("features", "label", "classes", "offset", "scale", "features_key", "label_key", "dtype")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    label: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    offset: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    features_key: str
    label_key: str
    dtype: str
    def __init__(self, features: _Optional[_Iterable[str]] = ..., label: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., offset: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ..., features_key: _Optional[str] = ..., label_key: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class TextInput(_message.Message):
    __slots__ = ("tokenizer_json", "max_length", "text_field", "label_field", "classes", "pad_id", "add_special_tokens")
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokenizer_json: bytes
    max_length: int
    text_field: str
    label_field: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    pad_id: int
    add_special_tokens: bool
    def __init__(self, tokenizer_json: _Optional[bytes] = ..., max_length: _Optional[int] = ..., text_field: _Optional[str] = ..., label_field: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., pad_id: _Optional[int] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class InputFormat(_message.Message):
    __slots__ = ("table", "text")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    table: TableInput
    text: TextInput
    def __init__(self, table: _Optional[_Union[TableInput, _Mapping]] = ..., text: _Optional[_Union[TextInput, _Mapping]] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("protocol_version", "session_id", "model", "projection", "task", "he", "packing", "public_context", "query", "query_norm", "disclosure", "grad_norm_bound", "query_budget", "max_samples", "dp_epsilon", "dp_delta", "input")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    HE_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERY_NORM_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    QUERY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: str
    model: ModelPayload
    projection: ProjectionSpec
    task: str
    he: HEParameters
    packing: Packing
    public_context: bytes
    query: _containers.RepeatedScalarFieldContainer[bytes]
    query_norm: float
    disclosure: Disclosure
    grad_norm_bound: float
    query_budget: int
    max_samples: int
    dp_epsilon: float
    dp_delta: float
    input: InputFormat
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[ModelPayload, _Mapping]] = ..., projection: _Optional[_Union[ProjectionSpec, _Mapping]] = ..., task: _Optional[str] = ..., he: _Optional[_Union[HEParameters, _Mapping]] = ..., packing: _Optional[_Union[Packing, _Mapping]] = ..., public_context: _Optional[bytes] = ..., query: _Optional[_Iterable[bytes]] = ..., query_norm: _Optional[float] = ..., disclosure: _Optional[_Union[Disclosure, str]] = ..., grad_norm_bound: _Optional[float] = ..., query_budget: _Optional[int] = ..., max_samples: _Optional[int] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., input: _Optional[_Union[InputFormat, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("gradients_s", "commit_s", "encrypted_s", "total_s")
    GRADIENTS_S_FIELD_NUMBER: _ClassVar[int]
    COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    gradients_s: float
    commit_s: float
    encrypted_s: float
    total_s: float
    def __init__(self, gradients_s: _Optional[float] = ..., commit_s: _Optional[float] = ..., encrypted_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("protocol_version", "session_id", "seller_id", "n_samples", "commitment", "n_rows", "scores", "timings", "clipped", "dp_epsilon", "dp_delta", "noise_std", "noise_commitment")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SELLER_ID_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    NOISE_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: str
    seller_id: str
    n_samples: int
    commitment: bytes
    n_rows: int
    scores: _containers.RepeatedScalarFieldContainer[bytes]
    timings: Timings
    clipped: int
    dp_epsilon: float
    dp_delta: float
    noise_std: float
    noise_commitment: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[str] = ..., seller_id: _Optional[str] = ..., n_samples: _Optional[int] = ..., commitment: _Optional[bytes] = ..., n_rows: _Optional[int] = ..., scores: _Optional[_Iterable[bytes]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., clipped: _Optional[int] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., noise_std: _Optional[float] = ..., noise_commitment: _Optional[bytes] = ...) -> None: ...

class ValueRequest(_message.Message):
    __slots__ = ("offer",)
    OFFER_FIELD_NUMBER: _ClassVar[int]
    offer: Offer
    def __init__(self, offer: _Optional[_Union[Offer, _Mapping]] = ...) -> None: ...

class ValueResponse(_message.Message):
    __slots__ = ("reply",)
    REPLY_FIELD_NUMBER: _ClassVar[int]
    reply: Reply
    def __init__(self, reply: _Optional[_Union[Reply, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("protocol_version", "seller_id", "n_samples")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELLER_ID_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    seller_id: str
    n_samples: int
    def __init__(self, protocol_version: _Optional[int] = ..., seller_id: _Optional[str] = ..., n_samples: _Optional[int] = ...) -> None: ...
