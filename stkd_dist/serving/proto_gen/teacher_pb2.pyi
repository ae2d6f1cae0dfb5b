from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    FLOAT32: _ClassVar[WireDtype]
    FLOAT16: _ClassVar[WireDtype]
    BFLOAT16: _ClassVar[WireDtype]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    PREDICTION: _ClassVar[Output]
    SPREAD: _ClassVar[Output]
    HIDDEN: _ClassVar[Output]
WIRE_DTYPE_UNSPECIFIED: WireDtype
FLOAT32: WireDtype
FLOAT16: WireDtype
BFLOAT16: WireDtype
OUTPUT_UNSPECIFIED: Output
PREDICTION: Output
SPREAD: Output
HIDDEN: Output

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitInfo(_message.Message):
    __slots__ = ("split", "windows", "start", "stop", "step")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    split: str
    windows: int
    start: int
    stop: int
    step: int
    def __init__(self, split: _Optional[str] = ..., windows: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("teacher_version", "model_key", "dataset_fingerprint", "window_shape", "wire_dtypes", "horizon", "input_steps", "has_spread", "splits", "max_message_bytes", "server_id", "forward_windows", "cached_windows", "val_mae", "active_streams", "max_streams", "outstanding_windows", "streams_served", "idle_seconds", "hidden_dim")
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SHAPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    INPUT_STEPS_FIELD_NUMBER: _ClassVar[int]
    HAS_SPREAD_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CACHED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    VAL_MAE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_SERVED_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    teacher_version: str
    model_key: str
    dataset_fingerprint: str
    window_shape: _containers.RepeatedScalarFieldContainer[int]
    wire_dtypes: _containers.RepeatedScalarFieldContainer[WireDtype]
    horizon: int
    input_steps: int
    has_spread: bool
    splits: _containers.RepeatedCompositeFieldContainer[SplitInfo]
    max_message_bytes: int
    server_id: str
    forward_windows: int
    cached_windows: int
    val_mae: float
    active_streams: int
    max_streams: int
    outstanding_windows: int
    streams_served: int
    idle_seconds: float
    hidden_dim: int
    def __init__(self, teacher_version: _Optional[str] = ..., model_key: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., window_shape: _Optional[_Iterable[int]] = ..., wire_dtypes: _Optional[_Iterable[_Union[WireDtype, str]]] = ..., horizon: _Optional[int] = ..., input_steps: _Optional[int] = ..., has_spread: _Optional[bool] = ..., splits: _Optional[_Iterable[_Union[SplitInfo, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., server_id: _Optional[str] = ..., forward_windows: _Optional[int] = ..., cached_windows: _Optional[int] = ..., val_mae: _Optional[float] = ..., active_streams: _Optional[int] = ..., max_streams: _Optional[int] = ..., outstanding_windows: _Optional[int] = ..., streams_served: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., hidden_dim: _Optional[int] = ...) -> None: ...

class WindowRange(_message.Message):
    __slots__ = ("start", "stop", "step")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    step: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class WindowRanges(_message.Message):
    __slots__ = ("ranges",)
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[WindowRange]
    def __init__(self, ranges: _Optional[_Iterable[_Union[WindowRange, _Mapping]]] = ...) -> None: ...

class ShardPlanSpec(_message.Message):
    __slots__ = ("world_size", "rank", "epoch", "seed", "batch_size", "shuffle", "chunk_steps", "regroups")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_STEPS_FIELD_NUMBER: _ClassVar[int]
    REGROUPS_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    rank: int
    epoch: int
    seed: int
    batch_size: int
    shuffle: bool
    chunk_steps: int
    regroups: _containers.RepeatedCompositeFieldContainer[PlanRegroup]
    def __init__(self, world_size: _Optional[int] = ..., rank: _Optional[int] = ..., epoch: _Optional[int] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., shuffle: _Optional[bool] = ..., chunk_steps: _Optional[int] = ..., regroups: _Optional[_Iterable[_Union[PlanRegroup, _Mapping]]] = ...) -> None: ...

class PlanRegroup(_message.Message):
    __slots__ = ("world_size", "steps")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    steps: int
    def __init__(self, world_size: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class LabelRequest(_message.Message):
    __slots__ = ("dataset_fingerprint", "teacher_version", "split", "ranges", "plan", "resume_cursor", "wire_dtype", "outputs", "max_message_bytes")
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RESUME_CURSOR_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    dataset_fingerprint: str
    teacher_version: str
    split: str
    ranges: WindowRanges
    plan: ShardPlanSpec
    resume_cursor: int
    wire_dtype: WireDtype
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    max_message_bytes: int
    def __init__(self, dataset_fingerprint: _Optional[str] = ..., teacher_version: _Optional[str] = ..., split: _Optional[str] = ..., ranges: _Optional[_Union[WindowRanges, _Mapping]] = ..., plan: _Optional[_Union[ShardPlanSpec, _Mapping]] = ..., resume_cursor: _Optional[int] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ..., outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: WireDtype
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LabelChunk(_message.Message):
    __slots__ = ("window_indices", "prediction", "spread", "teacher_version", "cursor", "total", "crc32c", "node_start", "node_stop", "node_count", "hidden")
    WINDOW_INDICES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    NODE_START_FIELD_NUMBER: _ClassVar[int]
    NODE_STOP_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    window_indices: _containers.RepeatedScalarFieldContainer[int]
    prediction: Tensor
    spread: Tensor
    teacher_version: str
    cursor: int
    total: int
    crc32c: int
    node_start: int
    node_stop: int
    node_count: int
    hidden: Tensor
    def __init__(self, window_indices: _Optional[_Iterable[int]] = ..., prediction: _Optional[_Union[Tensor, _Mapping]] = ..., spread: _Optional[_Union[Tensor, _Mapping]] = ..., teacher_version: _Optional[str] = ..., cursor: _Optional[int] = ..., total: _Optional[int] = ..., crc32c: _Optional[int] = ..., node_start: _Optional[int] = ..., node_stop: _Optional[int] = ..., node_count: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
