from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Buffer(_message.Message):
    __slots__ = ("name", "dtype", "length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class LocalTraining(_message.Message):
    __slots__ = ("optimizer", "options", "epochs", "batch_size", "seed", "steps")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    options: _containers.ScalarMap[str, float]
    epochs: int
    batch_size: int
    seed: int
    steps: int
    def __init__(self, optimizer: _Optional[str] = ..., options: _Optional[_Mapping[str, float]] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("round", "task_id", "client_id", "local", "config_json", "n_classes", "buffers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    task_id: str
    client_id: int
    local: LocalTraining
    config_json: str
    n_classes: int
    buffers: _containers.RepeatedCompositeFieldContainer[Buffer]
    def __init__(self, round: _Optional[int] = ..., task_id: _Optional[str] = ..., client_id: _Optional[int] = ..., local: _Optional[_Union[LocalTraining, _Mapping]] = ..., config_json: _Optional[str] = ..., n_classes: _Optional[int] = ..., buffers: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ...) -> None: ...

class SecAggHeader(_message.Message):
    __slots__ = ("round", "task_id", "client_id", "phase", "length", "train_loss", "num_examples", "threshold", "max_weight")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    round: int
    task_id: str
    client_id: int
    phase: int
    length: int
    train_loss: float
    num_examples: float
    threshold: int
    max_weight: float
    def __init__(self, round: _Optional[int] = ..., task_id: _Optional[str] = ..., client_id: _Optional[int] = ..., phase: _Optional[int] = ..., length: _Optional[int] = ..., train_loss: _Optional[float] = ..., num_examples: _Optional[float] = ..., threshold: _Optional[int] = ..., max_weight: _Optional[float] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("task", "data", "done", "secagg")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    task: TaskHeader
    data: bytes
    done: Done
    secagg: SecAggHeader
    def __init__(self, task: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., secagg: _Optional[_Union[SecAggHeader, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    def __init__(self, client_id: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "task_id", "client_id", "num_examples", "train_loss", "buffers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    task_id: str
    client_id: int
    num_examples: float
    train_loss: float
    buffers: _containers.RepeatedCompositeFieldContainer[Buffer]
    def __init__(self, round: _Optional[int] = ..., task_id: _Optional[str] = ..., client_id: _Optional[int] = ..., num_examples: _Optional[float] = ..., train_loss: _Optional[float] = ..., buffers: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("header", "data", "secagg")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    secagg: SecAggHeader
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., secagg: _Optional[_Union[SecAggHeader, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
