from alignd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScorerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORER_KIND_UNSPECIFIED: _ClassVar[ScorerKind]
    SCORER_KIND_MODEL: _ClassVar[ScorerKind]
    SCORER_KIND_FUNCTION: _ClassVar[ScorerKind]
    SCORER_KIND_ENSEMBLE: _ClassVar[ScorerKind]
SCORER_KIND_UNSPECIFIED: ScorerKind
SCORER_KIND_MODEL: ScorerKind
SCORER_KIND_FUNCTION: ScorerKind
SCORER_KIND_ENSEMBLE: ScorerKind

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "chat", "response", "label")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: _common_pb2.Conversation
    response: str
    label: str
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "scorer", "isolated", "return_members")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    scorer: str
    isolated: bool
    return_members: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., scorer: _Optional[str] = ..., isolated: _Optional[bool] = ..., return_members: _Optional[bool] = ...) -> None: ...

class MemberScores(_message.Message):
    __slots__ = ("scorer", "scores")
    SCORER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scorer: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scorer: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "scorer", "members", "std")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    scorer: str
    members: _containers.RepeatedCompositeFieldContainer[MemberScores]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., scorer: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberScores, _Mapping]]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class CompareItem(_message.Message):
    __slots__ = ("prompt", "chat", "response_a", "response_b", "label")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: _common_pb2.Conversation
    response_a: str
    response_b: str
    label: str
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("items", "scorer", "isolated")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    ISOLATED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CompareItem]
    scorer: str
    isolated: bool
    def __init__(self, items: _Optional[_Iterable[_Union[CompareItem, _Mapping]]] = ..., scorer: _Optional[str] = ..., isolated: _Optional[bool] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("probabilities", "scores_a", "scores_b", "scorer")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    SCORES_A_FIELD_NUMBER: _ClassVar[int]
    SCORES_B_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    scores_a: _containers.RepeatedScalarFieldContainer[float]
    scores_b: _containers.RepeatedScalarFieldContainer[float]
    scorer: str
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., scores_a: _Optional[_Iterable[float]] = ..., scores_b: _Optional[_Iterable[float]] = ..., scorer: _Optional[str] = ...) -> None: ...

class ScoreNormalization(_message.Message):
    __slots__ = ("offset", "scale", "clip_min", "clip_max")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIP_MIN_FIELD_NUMBER: _ClassVar[int]
    CLIP_MAX_FIELD_NUMBER: _ClassVar[int]
    offset: float
    scale: float
    clip_min: float
    clip_max: float
    def __init__(self, offset: _Optional[float] = ..., scale: _Optional[float] = ..., clip_min: _Optional[float] = ..., clip_max: _Optional[float] = ...) -> None: ...

class EnsembleInfo(_message.Message):
    __slots__ = ("members", "aggregate", "k")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    aggregate: str
    k: float
    def __init__(self, members: _Optional[_Iterable[str]] = ..., aggregate: _Optional[str] = ..., k: _Optional[float] = ...) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("name", "kind", "model", "function", "normalization", "limits", "is_default", "format", "ensemble")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ScorerKind
    model: _common_pb2.ModelInfo
    function: str
    normalization: ScoreNormalization
    limits: _common_pb2.Limits
    is_default: bool
    format: str
    ensemble: EnsembleInfo
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ScorerKind, str]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., function: _Optional[str] = ..., normalization: _Optional[_Union[ScoreNormalization, _Mapping]] = ..., limits: _Optional[_Union[_common_pb2.Limits, _Mapping]] = ..., is_default: _Optional[bool] = ..., format: _Optional[str] = ..., ensemble: _Optional[_Union[EnsembleInfo, _Mapping]] = ...) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("server", "scorers")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    server: _common_pb2.ServerInfo
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    def __init__(self, server: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ..., scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ...) -> None: ...
