from alignd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeLogprobsRequest(_message.Message):
    __slots__ = ("input_ids", "prompt_lengths", "return_sums", "temperature", "isolated")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    RETURN_SUMS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    input_ids: _common_pb2.RaggedTensor
    prompt_lengths: _containers.RepeatedScalarFieldContainer[int]
    return_sums: bool
    temperature: float
    isolated: bool
    def __init__(self, input_ids: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., prompt_lengths: _Optional[_Iterable[int]] = ..., return_sums: _Optional[bool] = ..., temperature: _Optional[float] = ..., isolated: _Optional[bool] = ...) -> None: ...

class ComputeLogprobsResponse(_message.Message):
    __slots__ = ("logprobs", "sums")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.RaggedTensor
    sums: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., sums: _Optional[_Iterable[float]] = ...) -> None: ...

class ReferenceInfo(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: _common_pb2.ServerInfo
    def __init__(self, server: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ...) -> None: ...
