"""Hypothesis strategies for TrainerService requests: batches with the inputs each loss
reads, losses, Forward outputs, Initialize and PushWeights requests, each field valid or wild
(see :mod:`malformed`)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from malformed import (
    batch,
    enum,
    float_rows,
    ids,
    int32s,
    int64s,
    number,
    path,
    prompt_lengths,
    ragged_ids,
    requests,
    tensor,
    uint64s,
    wild_floats,
    wild_tensors,
)

from alignd.tensors import from_ragged
from alignd.v1 import common_pb2, trainer_pb2

MAX_BATCH = 8
PUSH_TARGETS = ["127.0.0.1:1", "localhost:1"]  # allowed, and nothing listens there
LM_LOSSES = ("cross_entropy", "dpo", "kto", "ppo", "policy_gradient")
PAIRWISE = ("dpo", "bradley_terry")
TOKEN_INPUTS = {
    "ppo": ("old_logprobs", "advantages", "returns", "old_values"),
    "policy_gradient": ("advantages", "old_logprobs", "ref_logprobs"),
}
OUTPUTS = (
    trainer_pb2.FORWARD_OUTPUT_LOGPROBS,
    trainer_pb2.FORWARD_OUTPUT_VALUES,
    trainer_pb2.FORWARD_OUTPUT_ENTROPY,
)
REWARDS = [trainer_pb2.FORWARD_OUTPUT_REWARDS]


def loss(f, kind: str) -> trainer_pb2.Loss:
    """The loss ``kind`` with its parameters in range, or (wild) out of range, or no loss."""
    if f.wild() and f.wild():
        return trainer_pb2.Loss()
    spec = {
        "cross_entropy": lambda: trainer_pb2.CrossEntropyLoss(
            label_smoothing=number(f, 0, 0.99, unset=False)
        ),
        "bradley_terry": lambda: trainer_pb2.BradleyTerryLoss(
            center_rewards_coefficient=number(f, 0, 10, unset=False)
        ),
        "dpo": lambda: trainer_pb2.DpoLoss(
            variant=enum(f, range(4)),
            beta=number(f, 0.01, 10),
            label_smoothing=number(f, 0, 0.49, unset=False),
        ),
        "kto": lambda: trainer_pb2.KtoLoss(
            beta=number(f, 0.01, 10),
            desirable_weight=number(f, 0.1, 10),
            undesirable_weight=number(f, 0.1, 10),
        ),
        "ppo": lambda: trainer_pb2.PpoLoss(
            clip_range=number(f, 0.01, 1),
            value_clip_range=number(f, 0.01, 10),
            vf_coef=number(f, 0, 10),
            entropy_coef=number(f, 0, 1, unset=False),
            temperature=number(f, 0.01, 100),
        ),
        "policy_gradient": lambda: trainer_pb2.PolicyGradientLoss(
            clip_range=number(f, 0.01, 1),
            kl_coef=number(f, 0, 1, unset=False),
            aggregation=enum(f, range(2)),
            temperature=number(f, 0.01, 100),
        ),
    }[kind]()
    return trainer_pb2.Loss(**{kind: spec})


def sequence_input(f, name: str, rows: int) -> common_pb2.Tensor:
    """(rows,) float32 values a loss reads per sequence, or (wild) the wrong size, non-finite
    values, or a wild tensor."""
    valid = {
        "labels": st.sampled_from([0.0, 1.0]),
        "kl_rows": st.sampled_from([0.0, 0.0, 1.0]),
        "margins": st.floats(0, 2),
        "ref_logps": st.floats(-50, 0),
    }[name]
    size = f(st.just(rows), st.sampled_from([0, rows + 1, 2 * rows]))
    values = f(
        st.lists(valid, min_size=size, max_size=size),
        st.lists(st.one_of(valid, wild_floats(), st.just(0.5)), min_size=size, max_size=size),
    )
    return f(st.just(tensor(values, common_pb2.DTYPE_FLOAT32)), wild_tensors())


@dataclass(frozen=True)
class Model:
    """What the strategies need to know of the model being fuzzed."""

    classifier: bool
    vocab: int
    max_length: int


def train_batch(f, kind: str, model: Model) -> trainer_pb2.Batch:
    """A batch with the inputs ``kind`` reads (2P rows for a pairwise loss), or (wild) with
    bad ids, prompt lengths, masks, missing, misshapen or unknown inputs."""
    if kind in PAIRWISE and not f.wild():
        pairs = [ids(f, model.vocab, min_size=2) for _ in range(f.draw(st.integers(1, 2)) * 2)]
        ragged = from_ragged(pairs, common_pb2.DTYPE_INT32)
    else:
        ragged = ragged_ids(f, model.vocab, MAX_BATCH, model.max_length)
    prompts = prompt_lengths(f, ragged, low=0 if model.classifier else 1)
    rows = len(ragged.lengths)
    out = trainer_pb2.Batch(input_ids=ragged, prompt_lengths=prompts)
    if model.classifier and f.draw(st.booleans()):
        del out.prompt_lengths[:]  # a classifier may leave them out
    # prompts may be too few or too many (wild): the rows they leave out have no inputs
    completions = [max(int(n) - p, 0) for n, p in zip(ragged.lengths, prompts, strict=False)]
    if f.wild():
        out.completion_mask.CopyFrom(float_rows(f, completions, 0, 1))
    for name in TOKEN_INPUTS.get(kind, ()):
        if not f.wild():
            low, high = (-20.0, 0.0) if name.endswith("logprobs") else (-5.0, 5.0)
            out.token_inputs[name].CopyFrom(float_rows(f, completions, low, high))
    names = {
        "dpo": ["ref_logps"],
        "kto": ["labels", "ref_logps", "kl_rows"],
        "bradley_terry": ["margins"] if f.draw(st.booleans()) else [],
    }.get(kind, [])
    for name in names:
        if not f.wild():
            size = rows // 2 if name == "margins" else rows
            out.sequence_inputs[name].CopyFrom(sequence_input(f, name, size))
    if f.wild():
        out.token_inputs[f.draw(st.sampled_from(["", "nope", "advantages"]))].CopyFrom(
            float_rows(f, completions)
        )
    if f.wild():
        out.sequence_inputs[f.draw(st.sampled_from(["", "nope", "labels"]))].CopyFrom(
            f.draw(wild_tensors())
        )
    return out


def forward_backward_requests(model: Model) -> st.SearchStrategy:
    """ForwardBackward with any loss (the ones the model kind has, mostly) and its inputs."""
    kinds = (
        ("bradley_terry", "cross_entropy") if model.classifier else (*LM_LOSSES, "bradley_terry")
    )

    def build(f) -> trainer_pb2.ForwardBackwardRequest:
        kind = f.draw(st.sampled_from(kinds))
        return trainer_pb2.ForwardBackwardRequest(
            batch=train_batch(f, kind, model),
            loss=loss(f, kind),
            loss_scale=number(f, 1e-3, 100),
        )

    return requests(build)


def forward_requests(model: Model) -> st.SearchStrategy:
    """Forward of a batch: the outputs the model has (rewards of a classifier; log-probs,
    values, entropies of the causal LM), or (wild) none, unknown or unsupported ones."""
    valid = (
        st.just(REWARDS)
        if model.classifier
        else st.lists(st.sampled_from(OUTPUTS), min_size=1, max_size=3)
    )
    wild = st.lists(st.sampled_from([0, *OUTPUTS, 4, 5, 99, -1]), max_size=3)
    return requests(
        lambda f: trainer_pb2.ForwardRequest(
            batch=train_batch(f, "forward", model),
            outputs=f(valid, wild),
            temperature=number(f, 0.01, 100),
        )
    )


def initialize_requests(good: list[str], bad: list[str]) -> st.SearchStrategy:
    """Initialize from one of the ``good`` model paths (or, wild, a ``bad`` one), with any
    kind, dtype, optimizer, schedule, clipping, LoRA and packing settings."""

    def packing(f) -> trainer_pb2.PackingConfig | None:
        if not f.draw(st.booleans()):
            return None
        limits = [0, 1, 2, 1 << 20, (1 << 20) + 1, 2**32 - 1]
        tokens = f(st.sampled_from([0, 0, 8, 64]), st.sampled_from(limits))
        return trainer_pb2.PackingConfig(max_tokens=tokens)

    def lora(f) -> trainer_pb2.LoraConfig | None:
        if not f.draw(st.sampled_from([True, False, False])):
            return None
        modules = f(
            st.lists(st.sampled_from(["q_proj", "v_proj"]), max_size=2, unique=True),
            st.lists(
                st.sampled_from(["", " ", "nope", "score", "lm_head", "*", "model"]),
                min_size=1,
                max_size=2,
            ),
        )
        return trainer_pb2.LoraConfig(
            r=f(st.integers(1, 8), int32s(1024, 1025)),
            alpha=number(f, 0.1, 64),
            dropout=number(f, 0, 0.5, unset=False),
            target_modules=modules,
        )

    def build(f) -> trainer_pb2.InitializeRequest:
        warmup = f(st.integers(0, 5), int32s())
        return trainer_pb2.InitializeRequest(
            model_path=path(f, good, bad),
            kind=enum(f, [1, 2, 3]),
            dtype=f(
                st.sampled_from(["", "float32"]),
                st.sampled_from(["bfloat16", "float16", "int8", "FLOAT32", "\x00", "x" * 999]),
            ),
            optimizer=trainer_pb2.AdamWConfig(
                lr=number(f, 1e-6, 1),
                beta1=number(f, 0, 0.999),
                beta2=number(f, 0, 0.999),
                eps=number(f, 1e-12, 1),
                weight_decay=number(f, 0, 10),
            ),
            schedule=trainer_pb2.ScheduleConfig(
                kind=enum(f, range(3)),
                warmup_steps=warmup,
                total_steps=f(st.integers(6, 100), int32s()),
                min_lr_ratio=number(f, 0, 1, unset=False),
            ),
            max_grad_norm=number(f, 0, 10),
            gradient_checkpointing=f.draw(st.booleans()),
            lora=lora(f),
            seed=f.draw(st.one_of(st.none(), uint64s())),
            packing=packing(f),
        )

    return requests(build)


def push_requests(shared_good: list[str], shared_bad: list[str]) -> st.SearchStrategy:
    """PushWeights to allowed targets (nothing listens there) or malformed and foreign ones,
    with any version, timeout and shared path."""
    bad_addresses = [  # malformed, not allowed, or (the last two) allowed in another spelling
        "", "127.0.0.1:2", "10.0.0.1:50051", "dns:///localhost:1", "unix:/tmp/x", "localhost",
        "localhost:0", "localhost:65536", "localhost:-1", "a b:1", "[::1", "::1:1", "[::1]:1",
        "x" * 5000 + ":1", "\x00:1", "127.0.0.1:1/x", "LOCALHOST:1", "127.0.0.1:01",
    ]  # fmt: skip

    def target(f) -> trainer_pb2.PushTarget:
        return trainer_pb2.PushTarget(
            address=f(st.sampled_from(PUSH_TARGETS), st.sampled_from(bad_addresses))
        )

    return requests(
        lambda f: trainer_pb2.PushWeightsRequest(
            targets=batch(f, target, 64, max_size=2),
            version=f(st.integers(1, 50), int64s()),
            timeout_seconds=f(st.sampled_from([0.0, 0.5, 5.0]), wild_floats()),
            shared_path=f(st.sampled_from(["", *shared_good]), st.sampled_from(shared_bad)),
        )
    )
