from protos import pdcluster_pb2 as _pdcluster_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillWork(_message.Message):
    __slots__ = ("req_id", "prompt_token_ids", "sampling")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _pdcluster_pb2.SamplingParams
    def __init__(self, req_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_pdcluster_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class DecodeWork(_message.Message):
    __slots__ = ("req_id", "prompt_token_ids", "first_token_id", "sampling", "offer")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    sampling: _pdcluster_pb2.SamplingParams
    offer: bytes
    def __init__(self, req_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[_pdcluster_pb2.SamplingParams, _Mapping]] = ..., offer: _Optional[bytes] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("req_id",)
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    def __init__(self, req_id: _Optional[str] = ...) -> None: ...

class EarlyOffer(_message.Message):
    __slots__ = ("req_id", "offer", "prompt_token_ids")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    offer: bytes
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, req_id: _Optional[str] = ..., offer: _Optional[bytes] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PeerLost(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    def __init__(self, endpoint: _Optional[str] = ...) -> None: ...

class ToWorker(_message.Message):
    __slots__ = ("prefill", "decode", "abort", "prefetch", "peer_lost")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    PEER_LOST_FIELD_NUMBER: _ClassVar[int]
    prefill: PrefillWork
    decode: DecodeWork
    abort: Abort
    prefetch: EarlyOffer
    peer_lost: PeerLost
    def __init__(self, prefill: _Optional[_Union[PrefillWork, _Mapping]] = ..., decode: _Optional[_Union[DecodeWork, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., prefetch: _Optional[_Union[EarlyOffer, _Mapping]] = ..., peer_lost: _Optional[_Union[PeerLost, _Mapping]] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("req_id", "first_token_id", "offer", "finish_reason", "queue_s", "prefill_s")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    first_token_id: int
    offer: bytes
    finish_reason: str
    queue_s: float
    prefill_s: float
    def __init__(self, req_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., offer: _Optional[bytes] = ..., finish_reason: _Optional[str] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("req_id", "token_ids", "finish_reason", "transfer_s")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    transfer_s: float
    def __init__(self, req_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., transfer_s: _Optional[float] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("req_id", "error", "retry", "instance_fault")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FAULT_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    error: str
    retry: bool
    instance_fault: bool
    def __init__(self, req_id: _Optional[str] = ..., error: _Optional[str] = ..., retry: _Optional[bool] = ..., instance_fault: _Optional[bool] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("num_waiting", "num_running", "queued_prompt_tokens", "num_free_blocks", "num_blocks", "num_leases", "mean_step_s", "num_steps")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    MEAN_STEP_S_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    queued_prompt_tokens: int
    num_free_blocks: int
    num_blocks: int
    num_leases: int
    mean_step_s: float
    num_steps: int
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., queued_prompt_tokens: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_leases: _Optional[int] = ..., mean_step_s: _Optional[float] = ..., num_steps: _Optional[int] = ...) -> None: ...

class FromWorker(_message.Message):
    __slots__ = ("instance", "prefilled", "tokens", "failed", "load", "offered")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    OFFERED_FIELD_NUMBER: _ClassVar[int]
    instance: str
    prefilled: _containers.RepeatedCompositeFieldContainer[PrefillDone]
    tokens: _containers.RepeatedCompositeFieldContainer[Tokens]
    failed: _containers.RepeatedCompositeFieldContainer[Failed]
    load: Load
    offered: _containers.RepeatedCompositeFieldContainer[EarlyOffer]
    def __init__(self, instance: _Optional[str] = ..., prefilled: _Optional[_Iterable[_Union[PrefillDone, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[Tokens, _Mapping]]] = ..., failed: _Optional[_Iterable[_Union[Failed, _Mapping]]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., offered: _Optional[_Iterable[_Union[EarlyOffer, _Mapping]]] = ...) -> None: ...
