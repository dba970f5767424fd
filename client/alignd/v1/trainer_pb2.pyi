from alignd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_CAUSAL_LM: _ClassVar[ModelKind]
    MODEL_KIND_CAUSAL_LM_VALUE: _ClassVar[ModelKind]
    MODEL_KIND_SEQUENCE_CLASSIFIER: _ClassVar[ModelKind]

class ScheduleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULE_KIND_CONSTANT: _ClassVar[ScheduleKind]
    SCHEDULE_KIND_LINEAR: _ClassVar[ScheduleKind]
    SCHEDULE_KIND_COSINE: _ClassVar[ScheduleKind]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_TOKEN_MEAN: _ClassVar[Aggregation]
    AGGREGATION_SEQUENCE_MEAN: _ClassVar[Aggregation]

class ForwardOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORWARD_OUTPUT_UNSPECIFIED: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_LOGPROBS: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_VALUES: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_ENTROPY: _ClassVar[ForwardOutput]
    FORWARD_OUTPUT_REWARDS: _ClassVar[ForwardOutput]
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_CAUSAL_LM: ModelKind
MODEL_KIND_CAUSAL_LM_VALUE: ModelKind
MODEL_KIND_SEQUENCE_CLASSIFIER: ModelKind
SCHEDULE_KIND_CONSTANT: ScheduleKind
SCHEDULE_KIND_LINEAR: ScheduleKind
SCHEDULE_KIND_COSINE: ScheduleKind
AGGREGATION_TOKEN_MEAN: Aggregation
AGGREGATION_SEQUENCE_MEAN: Aggregation
FORWARD_OUTPUT_UNSPECIFIED: ForwardOutput
FORWARD_OUTPUT_LOGPROBS: ForwardOutput
FORWARD_OUTPUT_VALUES: ForwardOutput
FORWARD_OUTPUT_ENTROPY: ForwardOutput
FORWARD_OUTPUT_REWARDS: ForwardOutput

class AdamWConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class ScheduleConfig(_message.Message):
    __slots__ = ("kind", "warmup_steps", "total_steps", "min_lr_ratio")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    kind: ScheduleKind
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    def __init__(self, kind: _Optional[_Union[ScheduleKind, str]] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class PackingConfig(_message.Message):
    __slots__ = ("max_tokens",)
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ...) -> None: ...

class InitializeRequest(_message.Message):
    __slots__ = ("model_path", "kind", "dtype", "optimizer", "schedule", "max_grad_norm", "gradient_checkpointing", "lora", "seed", "packing")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    kind: ModelKind
    dtype: str
    optimizer: AdamWConfig
    schedule: ScheduleConfig
    max_grad_norm: float
    gradient_checkpointing: bool
    lora: LoraConfig
    seed: int
    packing: PackingConfig
    def __init__(self, model_path: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., dtype: _Optional[str] = ..., optimizer: _Optional[_Union[AdamWConfig, _Mapping]] = ..., schedule: _Optional[_Union[ScheduleConfig, _Mapping]] = ..., max_grad_norm: _Optional[float] = ..., gradient_checkpointing: _Optional[bool] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., seed: _Optional[int] = ..., packing: _Optional[_Union[PackingConfig, _Mapping]] = ...) -> None: ...

class InitializeResponse(_message.Message):
    __slots__ = ("model", "trainable_parameters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    trainable_parameters: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., trainable_parameters: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("input_ids", "prompt_lengths", "completion_mask", "token_inputs", "sequence_inputs")
    class TokenInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.RaggedTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ...) -> None: ...
    class SequenceInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_MASK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _common_pb2.RaggedTensor
    prompt_lengths: _containers.RepeatedScalarFieldContainer[int]
    completion_mask: _common_pb2.RaggedTensor
    token_inputs: _containers.MessageMap[str, _common_pb2.RaggedTensor]
    sequence_inputs: _containers.MessageMap[str, _common_pb2.Tensor]
    def __init__(self, input_ids: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., prompt_lengths: _Optional[_Iterable[int]] = ..., completion_mask: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., token_inputs: _Optional[_Mapping[str, _common_pb2.RaggedTensor]] = ..., sequence_inputs: _Optional[_Mapping[str, _common_pb2.Tensor]] = ...) -> None: ...

class CrossEntropyLoss(_message.Message):
    __slots__ = ("label_smoothing",)
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    label_smoothing: float
    def __init__(self, label_smoothing: _Optional[float] = ...) -> None: ...

class BradleyTerryLoss(_message.Message):
    __slots__ = ("center_rewards_coefficient",)
    CENTER_REWARDS_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    center_rewards_coefficient: float
    def __init__(self, center_rewards_coefficient: _Optional[float] = ...) -> None: ...

class DpoLoss(_message.Message):
    __slots__ = ("variant", "beta", "label_smoothing")
    class Variant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VARIANT_SIGMOID: _ClassVar[DpoLoss.Variant]
        VARIANT_IPO: _ClassVar[DpoLoss.Variant]
        VARIANT_HINGE: _ClassVar[DpoLoss.Variant]
        VARIANT_ROBUST: _ClassVar[DpoLoss.Variant]
    VARIANT_SIGMOID: DpoLoss.Variant
    VARIANT_IPO: DpoLoss.Variant
    VARIANT_HINGE: DpoLoss.Variant
    VARIANT_ROBUST: DpoLoss.Variant
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    variant: DpoLoss.Variant
    beta: float
    label_smoothing: float
    def __init__(self, variant: _Optional[_Union[DpoLoss.Variant, str]] = ..., beta: _Optional[float] = ..., label_smoothing: _Optional[float] = ...) -> None: ...

class KtoLoss(_message.Message):
    __slots__ = ("beta", "desirable_weight", "undesirable_weight")
    BETA_FIELD_NUMBER: _ClassVar[int]
    DESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNDESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    beta: float
    desirable_weight: float
    undesirable_weight: float
    def __init__(self, beta: _Optional[float] = ..., desirable_weight: _Optional[float] = ..., undesirable_weight: _Optional[float] = ...) -> None: ...

class PpoLoss(_message.Message):
    __slots__ = ("clip_range", "value_clip_range", "vf_coef", "entropy_coef", "temperature", "is_cap")
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    VF_COEF_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_COEF_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    IS_CAP_FIELD_NUMBER: _ClassVar[int]
    clip_range: float
    value_clip_range: float
    vf_coef: float
    entropy_coef: float
    temperature: float
    is_cap: float
    def __init__(self, clip_range: _Optional[float] = ..., value_clip_range: _Optional[float] = ..., vf_coef: _Optional[float] = ..., entropy_coef: _Optional[float] = ..., temperature: _Optional[float] = ..., is_cap: _Optional[float] = ...) -> None: ...

class PolicyGradientLoss(_message.Message):
    __slots__ = ("clip_range", "kl_coef", "aggregation", "temperature", "is_cap")
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    IS_CAP_FIELD_NUMBER: _ClassVar[int]
    clip_range: float
    kl_coef: float
    aggregation: Aggregation
    temperature: float
    is_cap: float
    def __init__(self, clip_range: _Optional[float] = ..., kl_coef: _Optional[float] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., temperature: _Optional[float] = ..., is_cap: _Optional[float] = ...) -> None: ...

class Loss(_message.Message):
    __slots__ = ("cross_entropy", "bradley_terry", "dpo", "kto", "ppo", "policy_gradient")
    CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    BRADLEY_TERRY_FIELD_NUMBER: _ClassVar[int]
    DPO_FIELD_NUMBER: _ClassVar[int]
    KTO_FIELD_NUMBER: _ClassVar[int]
    PPO_FIELD_NUMBER: _ClassVar[int]
    POLICY_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    cross_entropy: CrossEntropyLoss
    bradley_terry: BradleyTerryLoss
    dpo: DpoLoss
    kto: KtoLoss
    ppo: PpoLoss
    policy_gradient: PolicyGradientLoss
    def __init__(self, cross_entropy: _Optional[_Union[CrossEntropyLoss, _Mapping]] = ..., bradley_terry: _Optional[_Union[BradleyTerryLoss, _Mapping]] = ..., dpo: _Optional[_Union[DpoLoss, _Mapping]] = ..., kto: _Optional[_Union[KtoLoss, _Mapping]] = ..., ppo: _Optional[_Union[PpoLoss, _Mapping]] = ..., policy_gradient: _Optional[_Union[PolicyGradientLoss, _Mapping]] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("batch", "loss", "loss_scale", "defer_sync")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFER_SYNC_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    loss: Loss
    loss_scale: float
    defer_sync: bool
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., loss: _Optional[_Union[Loss, _Mapping]] = ..., loss_scale: _Optional[float] = ..., defer_sync: _Optional[bool] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("loss", "metrics", "num_tokens", "accumulated_batches")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    metrics: _containers.ScalarMap[str, float]
    num_tokens: int
    accumulated_batches: int
    def __init__(self, loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_tokens: _Optional[int] = ..., accumulated_batches: _Optional[int] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("grad_norm", "learning_rate", "step")
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    grad_norm: float
    learning_rate: float
    step: int
    def __init__(self, grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("batch", "outputs", "temperature")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    outputs: _containers.RepeatedScalarFieldContainer[ForwardOutput]
    temperature: float
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[ForwardOutput, str]]] = ..., temperature: _Optional[float] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logprobs", "values", "entropy", "rewards")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.RaggedTensor
    values: _common_pb2.RaggedTensor
    entropy: _common_pb2.RaggedTensor
    rewards: _common_pb2.Tensor
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., values: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., entropy: _Optional[_Union[_common_pb2.RaggedTensor, _Mapping]] = ..., rewards: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("path", "include_optimizer")
    PATH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    path: str
    include_optimizer: bool
    def __init__(self, path: _Optional[str] = ..., include_optimizer: _Optional[bool] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "bytes", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    step: int
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("path", "load_optimizer")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    path: str
    load_optimizer: bool
    def __init__(self, path: _Optional[str] = ..., load_optimizer: _Optional[bool] = ...) -> None: ...

class LoadCheckpointResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class PushWeightsRequest(_message.Message):
    __slots__ = ("targets", "version", "timeout_seconds", "shared_path", "rendezvous", "bucket_bytes")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARED_PATH_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[PushTarget]
    version: int
    timeout_seconds: float
    shared_path: str
    rendezvous: str
    bucket_bytes: int
    def __init__(self, targets: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ..., version: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., shared_path: _Optional[str] = ..., rendezvous: _Optional[str] = ..., bucket_bytes: _Optional[int] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("address", "ok", "error", "seconds", "bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    ok: bool
    error: str
    seconds: float
    bytes: int
    def __init__(self, address: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class PushWeightsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PushResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PushResult, _Mapping]]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerState(_message.Message):
    __slots__ = ("initialized", "kind", "step", "accumulated_batches", "learning_rate", "trainable_parameters", "pushed_version")
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_VERSION_FIELD_NUMBER: _ClassVar[int]
    initialized: bool
    kind: ModelKind
    step: int
    accumulated_batches: int
    learning_rate: float
    trainable_parameters: int
    pushed_version: int
    def __init__(self, initialized: _Optional[bool] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., step: _Optional[int] = ..., accumulated_batches: _Optional[int] = ..., learning_rate: _Optional[float] = ..., trainable_parameters: _Optional[int] = ..., pushed_version: _Optional[int] = ...) -> None: ...

class TrainerInfo(_message.Message):
    __slots__ = ("server", "world_size", "backend", "parallel", "dtype", "parameter_bytes", "optimizer_bytes", "packing")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    server: _common_pb2.ServerInfo
    world_size: int
    backend: str
    parallel: str
    dtype: str
    parameter_bytes: _containers.RepeatedScalarFieldContainer[int]
    optimizer_bytes: _containers.RepeatedScalarFieldContainer[int]
    packing: bool
    def __init__(self, server: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ..., world_size: _Optional[int] = ..., backend: _Optional[str] = ..., parallel: _Optional[str] = ..., dtype: _Optional[str] = ..., parameter_bytes: _Optional[_Iterable[int]] = ..., optimizer_bytes: _Optional[_Iterable[int]] = ..., packing: _Optional[bool] = ...) -> None: ...
