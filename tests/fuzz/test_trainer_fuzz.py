"""TrainerService under malformed requests: every RPC answers with a bad-input code, never
INTERNAL, and afterwards valid requests get exactly the answers they got before.

A valid request may legitimately change the trainer, so every example starts from a known
state, S0 (the tiny causal LM with a value head, Initialize with a fixed seed): a request that
was accepted and changed the weights or the model (OptimStep, Initialize, LoadCheckpoint) is
followed by Initialize(S0) again; an accepted ForwardBackward must add exactly one accumulated
batch (and every third one is followed by an OptimStep, itself checked); any refused request
must leave GetState exactly as it was (step, accumulation, learning rate, model kind, trainable
parameters, pushed version). A request cut off by its deadline may still have run, so the
test starts from S0 again (that Initialize queues behind it on the one compute thread). A model
that a fuzzed Initialize loaded (LoRA, another dtype, kind or optimizer) first goes through
every primitive once, checked like the fuzzed requests. After each method's run, Forward gives
the log-probs, values and entropies recorded at the start, bit for bit. Sequence-classifier
losses and rewards run the same way from S1 (the tiny BERT as a classifier).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from fuzzing import Fuzzer, Shot, budgets, check_counts
from hypothesis import strategies as st
from malformed import hostile_paths, path, raw_requests, requests, tokenize_requests
from safetensors.numpy import load_file, save_file
from trainer_requests import (
    MAX_BATCH,
    OUTPUTS,
    PUSH_TARGETS,
    REWARDS,
    Model,
    forward_backward_requests,
    forward_requests,
    initialize_requests,
    push_requests,
)

from alignd import TrainerClient
from alignd.tensors import from_ragged, to_ragged
from alignd.v1 import common_pb2, trainer_pb2

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
FULL = {
    "Initialize": 300,
    "ForwardBackward": 1000,
    "OptimStep": 100,
    "Forward": 500,
    "SaveCheckpoint": 200,
    "LoadCheckpoint": 300,
    "PushWeights": 250,
    "Tokenize": 300,
    "GetState": 50,
    "GetInfo": 50,
    "ForwardBackward/classifier": 300,
    "Forward/classifier": 150,
}
CHANGES_MODEL = {"Initialize", "LoadCheckpoint", "OptimStep"}
STATEFUL = {*CHANGES_MODEL, "ForwardBackward"}
OK, DEADLINE = grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED
EXERCISED = "exercised"


def damaged_checkpoints(checkpoint: Path, root: Path) -> list[str]:
    """Copies of ``checkpoint``, each damaged in one file."""
    made = []

    def copy(label: str) -> Path:
        made.append(root / label)
        shutil.copytree(checkpoint, made[-1])
        return made[-1]

    weights = load_file(str(checkpoint / "model.safetensors"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (copy("no-config") / "config.json").unlink()
    (copy("garbage") / "model.safetensors").write_bytes(os.urandom(512))
    data = (checkpoint / "model.safetensors").read_bytes()
    (copy("truncated") / "model.safetensors").write_bytes(data[: len(data) // 2])
    save_file(
        {**weights, "model.norm.weight": np.full(64, np.nan, np.float32)},
        str(copy("nan") / "model.safetensors"),
    )
    save_file(
        {**weights, "model.norm.weight": np.ones(3, np.float32)},
        str(copy("shape") / "model.safetensors"),
    )
    save_file({"x": np.ones(3, np.float32)}, str(copy("value-head") / "value_head.safetensors"))
    for label, text in [
        ("bad-json", "{"),
        ("json-list", "[]"),
        ("step", json.dumps({**state, "step": -1})),
        ("step-float", json.dumps({**state, "step": 1.5})),
        (
            "lr-nan",
            json.dumps(
                {**state, "param_groups": [{**state["param_groups"][0], "lr": float("nan")}]}
            ),
        ),
        ("no-groups", json.dumps({**state, "param_groups": []})),
    ]:
        (copy(label) / "trainer_state.json").write_text(text)
    data = (checkpoint / "trainer_state.safetensors").read_bytes()
    (copy("state-truncated") / "trainer_state.safetensors").write_bytes(data[:100])
    (copy("adapter") / "adapter.json").write_text('{"base_model": 3}')
    link = copy("symlink") / "model.safetensors"
    link.unlink()
    link.symlink_to("/etc/hostname")
    return [str(p) for p in made]


PROBE = [np.array([5, 6, 7, 8, 9, 10], np.int32), np.array([11, 12, 13, 14], np.int32)]


def probe_batch() -> trainer_pb2.Batch:
    """Two valid rows (ids valid for both tiny vocabularies)."""
    return trainer_pb2.Batch(
        input_ids=from_ragged(PROBE, common_pb2.DTYPE_INT32), prompt_lengths=[2, 1]
    )


def answers(client: TrainerClient, classifier: bool) -> list[np.ndarray]:
    """What valid requests get: Forward outputs (rewards of a classifier; log-probs, values
    and entropies of the causal LM, and a tokenization)."""
    outputs = REWARDS if classifier else OUTPUTS
    response = client._call(
        "Forward", trainer_pb2.ForwardRequest(batch=probe_batch(), outputs=outputs)
    )
    if classifier:
        return [np.frombuffer(response.rewards.data, "<f4")]
    tokens = client.tokenize([[{"role": "user", "content": "Hi"}]], ["Hello"])[0]
    rows = [
        r for name in ("logprobs", "values", "entropy") for r in to_ragged(getattr(response, name))
    ]
    return [*rows, tokens.input_ids]


class KnownState:
    """The trainer as every example must find it: Initialize(spec), and the state it gave.

    Args:
        client: talks to the trainer.
        fuzz: fires (and checks) the requests this class makes on the fuzz's behalf.
        directory: where checkpoints of fuzzed models go.
    """

    def __init__(self, client: TrainerClient, fuzz: Fuzzer, directory: Path) -> None:
        self.client, self.fuzz, self.directory = client, fuzz, directory
        self.spec: trainer_pb2.InitializeRequest | None = None
        self.state: trainer_pb2.TrainerState | None = None

    def start(self, spec: trainer_pb2.InitializeRequest | None = None) -> None:
        """Initializes ``spec`` (default: the current one) and records the state."""
        self.spec = spec or self.spec
        self.client._call("Initialize", self.spec)
        self.state = self.client.state()

    def after(self, method: str):
        """The ``after`` hook of a run of ``method``."""
        return lambda shot, answer: self.settle(answer, method)

    def settle(self, answer, method: str) -> None:
        """Starts from the known state again after a change; checks a refusal changed
        nothing."""
        if answer.code == DEADLINE and method in STATEFUL:  # it may have run all the same;
            return self.start()  # Initialize runs after it on the one compute thread
        if answer.code == OK and method == "Initialize":
            self.exercise()
        if answer.code == OK and method in CHANGES_MODEL:
            return self.start()
        if answer.code == OK and method == "ForwardBackward":
            self.state.accumulated_batches += 1
            assert answer.response.accumulated_batches == self.state.accumulated_batches
            if self.fuzz.codes["ForwardBackward", "OK"] % 3 == 0:
                return self.settle(self.fuzz.fire("OptimStep", Shot(b"")), "OptimStep")
        if method == "OptimStep" and "gradient norm is" in answer.details:
            self.state.accumulated_batches = 0  # dropped, as documented
        assert self.client.state() == self.state, (method, answer)

    def exercise(self) -> None:
        """Runs the primitives once on a model a fuzzed Initialize loaded (another kind,
        dtype, LoRA, optimizer or schedule), each checked like a fuzzed request."""
        kind = self.client.state().kind
        classifier = kind == trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER
        loss = (
            trainer_pb2.Loss(bradley_terry=trainer_pb2.BradleyTerryLoss())
            if classifier
            else trainer_pb2.Loss(cross_entropy=trainer_pb2.CrossEntropyLoss())
        )
        outputs = REWARDS if classifier else [trainer_pb2.FORWARD_OUTPUT_LOGPROBS]
        if kind == trainer_pb2.MODEL_KIND_CAUSAL_LM_VALUE:
            outputs = OUTPUTS
        saved = str(self.directory / EXERCISED)
        calls = [
            ("ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=probe_batch(), loss=loss)),
            ("OptimStep", trainer_pb2.OptimStepRequest()),
            ("Forward", trainer_pb2.ForwardRequest(batch=probe_batch(), outputs=outputs)),
            ("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=saved)),
            ("LoadCheckpoint", trainer_pb2.LoadCheckpointRequest(path=saved)),
            (
                "PushWeights",
                trainer_pb2.PushWeightsRequest(
                    targets=[trainer_pb2.PushTarget(address=PUSH_TARGETS[0])],
                    version=1,
                    timeout_seconds=5,
                ),
            ),
        ]
        for method, request in calls:
            self.fuzz.fire(method, Shot(request), "Initialize/exercise")


def model_of(client: TrainerClient, classifier: bool) -> Model:
    info = client.info().server
    return Model(classifier, info.model.vocab_size, info.limits.max_sequence_length)


def checked(client: TrainerClient, classifier: bool, expected: list, label: str) -> None:
    """Valid requests get ``expected``, bit for bit."""
    for a, b in zip(answers(client, classifier), expected, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"after fuzzing {label}")


def lm_runs(lm_model: Model, paths: dict[str, list[str]]) -> dict[str, st.SearchStrategy]:
    """The causal LM's runs, by method: request strategies with the paths they may use."""
    return {
        "Initialize": initialize_requests(paths["models"], paths["not_models"]),
        "ForwardBackward": forward_backward_requests(lm_model),
        "OptimStep": raw_requests(),
        "Forward": forward_requests(lm_model),
        "SaveCheckpoint": requests(
            lambda f: trainer_pb2.SaveCheckpointRequest(
                path=path(f, paths["save"], paths["not_save"]),
                include_optimizer=f.draw(st.one_of(st.none(), st.booleans())),
            )
        ),
        "LoadCheckpoint": requests(
            lambda f: trainer_pb2.LoadCheckpointRequest(
                path=path(f, paths["checkpoints"], paths["not_checkpoints"]),
                load_optimizer=f(st.one_of(st.none(), st.just(True)), st.just(False)),
            )
        ),
        "PushWeights": push_requests(paths["shared"], paths["not_shared"]),
        "Tokenize": tokenize_requests(lm_model.vocab, MAX_BATCH),
        "GetState": raw_requests(),
        "GetInfo": raw_requests(),
    }


def request_paths(tmp_path: Path, relative: str, lm: str, classifier: str) -> dict:
    """Paths the requests may name, good and bad for each use; makes the checkpoints and odd
    files they refer to (a checkpoint of the current model must exist at tmp_path/checkpoint)."""
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "outside").symlink_to("/etc")
    (tmp_path / "empty").mkdir()
    checkpoint = str(tmp_path / "checkpoint")
    exercised = str(tmp_path / EXERCISED)  # what KnownState.exercise saved last, if anything
    damaged = damaged_checkpoints(tmp_path / "checkpoint", tmp_path)
    odd = [str(tmp_path / p) for p in ("file", "file/sub", "outside", "outside/x", "missing/x/y")]
    hostile = [*hostile_paths(tmp_path), *odd]
    return {
        "models": [lm, "", classifier, checkpoint, exercised],
        "not_models": [*hostile, str(tmp_path / "empty"), *damaged[:3]],
        "save": [str(tmp_path / "save-a"), f"{relative}/save-b"],
        "not_save": [*hostile, str(tmp_path), lm],
        "checkpoints": [checkpoint, f"{relative}/checkpoint", exercised],
        "not_checkpoints": [*hostile, *damaged, str(tmp_path / "weights-only"), lm, classifier],
        "shared": [str(tmp_path / "shared"), f"{relative}/shared"],
        "not_shared": [*hostile, lm, checkpoint],
    }


@pytest.mark.parametrize("budget", budgets(FULL))
def test_trainer_refuses_malformed_requests_and_answers_valid_ones_unchanged(
    serve, tiny_models, tmp_path, storage_root, budget
):
    server = serve("trainer", max_batch_size=MAX_BATCH, push_targets=PUSH_TARGETS)
    lm, classifier = str(tiny_models.causal_lm), str(tiny_models.classifier)
    s0 = trainer_pb2.InitializeRequest(
        model_path=lm,
        kind=trainer_pb2.MODEL_KIND_CAUSAL_LM_VALUE,
        optimizer=trainer_pb2.AdamWConfig(lr=1e-3),
        seed=1,
    )
    s1 = trainer_pb2.InitializeRequest(
        model_path=classifier, kind=trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER, seed=1
    )
    with TrainerClient(server.target, retries=1) as client, Fuzzer(server.target, SERVICE) as fuzz:
        known = KnownState(client, fuzz, tmp_path)
        known.start(s1)
        classifier_model, before_classifier = model_of(client, True), answers(client, True)
        known.start(s0)
        lm_model, before = model_of(client, False), answers(client, False)
        client._call(
            "SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(tmp_path / "checkpoint"))
        )
        client._call(
            "SaveCheckpoint",
            trainer_pb2.SaveCheckpointRequest(
                path=str(tmp_path / "weights-only"), include_optimizer=False
            ),
        )
        paths = request_paths(tmp_path, os.path.relpath(tmp_path, storage_root), lm, classifier)

        known.start(s1)
        for method, strategy in (
            ("ForwardBackward", forward_backward_requests(classifier_model)),
            ("Forward", forward_requests(classifier_model)),
        ):
            label = f"{method}/classifier"
            fuzz.run(method, strategy, budget[label], known.after(method), label)
            checked(client, True, before_classifier, label)
        known.start(s0)
        checked(client, False, before, "the classifier")
        for method, strategy in lm_runs(lm_model, paths).items():
            fuzz.run(method, strategy, budget[method], known.after(method))
            checked(client, False, before, method)
        check_counts(fuzz, budget)
        assert client.state() == known.state
