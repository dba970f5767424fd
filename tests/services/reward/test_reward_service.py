"""RewardService over a real loopback server: exact scores, batch invariance, scorers, errors."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from alignd import RewardClient
from alignd.errors import InvalidArgumentError, ResourceExhaustedError
from alignd.v1 import common_pb2, reward_pb2
from alignd_server.common.models import load_sequence_classifier
from alignd_server.common.tokenization import tokenize

PROMPTS = ["How is the weather?", "Tell me a story about a dragon who learned to read.", "Hi"]
RESPONSES = ["Sunny and warm.", "Once upon a time " * 12, "Hello!"]
CHAT = [{"role": "user", "content": "Name a colour."}]


def in_process(path, prompt, response) -> float:
    """The same model, one item, no padding: transformers' own forward pass."""
    loaded = load_sequence_classifier(path)
    if isinstance(prompt, list) and not loaded.has_chat_template:
        prompt = "\n".join(m["content"] for m in prompt)
    ids = tokenize(loaded.tokenizer, prompt, response, max_length=4096).input_ids
    with torch.inference_mode():
        if hasattr(loaded.model, "score"):  # decoder: score the last token (the EOS)
            hidden = loaded.model.base_model(torch.tensor(ids[None], dtype=torch.long))[0]
            return float(loaded.model.score(hidden[0, -1]))
        return float(loaded.model(torch.tensor(ids[None], dtype=torch.long)).logits[0, 0])


@pytest.fixture(params=["encoder", "decoder"])
def reward_model(request, tiny_models):
    """A BERT classifier, and a Llama classifier (fresh head on the tiny causal LM, pad = EOS)."""
    return tiny_models.classifier if request.param == "encoder" else tiny_models.causal_lm


def test_scores_equal_an_in_process_forward(serve, reward_model):
    server = serve("reward", model=str(reward_model))
    with RewardClient(server.target) as client:
        scores = client.score(PROMPTS, RESPONSES)
        chat = client.score([CHAT], ["Blue."])
    assert scores.dtype == np.float32
    expected = [in_process(reward_model, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(chat, [in_process(reward_model, CHAT, "Blue.")], atol=1e-5)


def test_scores_do_not_depend_on_batch_composition(serve, reward_model):
    server = serve("reward", model=str(reward_model), max_wait_ms=20)
    item = ("What is two plus two?", "Four.")
    long_items = [("Write a long essay " * 10, "Essay body " * 30)] * 5
    short_items = [("Hi", "Yo"), ("A", "B"), ("Hey", "Hello")]
    with RewardClient(server.target) as client:
        alone = client.score([item[0]], [item[1]])[0]
        for others in (long_items, short_items):
            batch = [*others[:2], item, *others[2:]]
            scores = client.score([p for p, _ in batch], [r for _, r in batch])
            assert abs(scores[2] - alone) < 1e-5


def test_compare_is_the_bradley_terry_probability(serve, tiny_models):
    server = serve("reward")
    with RewardClient(server.target) as client:
        a = client.score(PROMPTS, RESPONSES)
        b = client.score(PROMPTS, ["No.", "No.", "No."])
        p = client.compare(PROMPTS, RESPONSES, ["No.", "No.", "No."])
    expected = 1.0 / (1.0 + np.exp(-(a.astype(np.float64) - b)))
    np.testing.assert_allclose(p, expected, atol=1e-6)


def test_normalization_stored_with_the_model_is_applied(serve, tiny_models, tmp_path):
    model = tmp_path / "normalized"
    shutil.copytree(tiny_models.classifier, model)
    raw_server = serve("reward")
    with RewardClient(raw_server.target) as client:
        raw = client.score(PROMPTS, RESPONSES)
    offset, scale, clip_max = 0.5, 3.0, float(3.0 * (np.median(raw) + 0.5))
    (model / "alignd_reward.json").write_text(
        json.dumps({"offset": offset, "scale": scale, "clip_max": clip_max})
    )
    server = serve("reward", model=str(model))
    with RewardClient(server.target) as client:
        scores = client.score(PROMPTS, RESPONSES)
        info = client.info()
    np.testing.assert_allclose(scores, np.minimum(scale * (raw + offset), clip_max), atol=1e-5)
    assert info.scorers[0].normalization.scale == scale
    assert info.scorers[0].normalization.clip_max == pytest.approx(clip_max)
    assert not info.scorers[0].normalization.HasField("clip_min")


@pytest.fixture
def oracle_module(tmp_path, monkeypatch):
    (tmp_path / "oracle_scorers.py").write_text(
        textwrap.dedent(
            """
            def length(prompt, response, label):
                return float(len(response))

            def exact(prompt, response, label):
                if label is None:
                    raise ValueError("this scorer needs a label")
                return 1.0 if response.strip() == label else 0.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "oracle_scorers"


def test_function_scorers_are_named_and_batched_like_models(serve, oracle_module):
    server = serve(
        "reward",
        scorers=[f"len=function:{oracle_module}:length", f"exact=function:{oracle_module}:exact"],
    )
    with RewardClient(server.target) as client:
        info = client.info()
        assert [s.name for s in info.scorers] == ["default", "len", "exact"]
        assert info.scorers[1].kind == reward_pb2.SCORER_KIND_FUNCTION
        assert info.scorers[1].function == f"{oracle_module}:length"
        np.testing.assert_array_equal(client.score(PROMPTS, RESPONSES, scorer="len"),
                                      [len(r) for r in RESPONSES])  # fmt: skip
        exact = client.score(["q", "q"], ["4", "5"], scorer="exact", labels=["4", "4"])
        np.testing.assert_array_equal(exact, [1.0, 0.0])
        with pytest.raises(InvalidArgumentError, match=r"items\[0\].response: scorer 'exact'"):
            client.score(["q"], ["4"], scorer="exact")
        np.testing.assert_allclose(client.compare(["q"], ["long answer"], ["s"], scorer="len"),
                                   [1 / (1 + np.exp(-10.0))], rtol=1e-6)  # fmt: skip


def test_default_scorer_can_be_a_function(serve, oracle_module):
    server = serve("reward", model="none", scorers=[f"len=function:{oracle_module}:length"],
                   default_scorer="len")  # fmt: skip
    with RewardClient(server.target) as client:
        assert client.score(["p"], ["abc"]).tolist() == [3.0]
        assert not client.info().server.HasField("model")


def test_large_client_batches_are_split_to_the_server_limit(serve):
    server = serve("reward", max_batch_size=4)
    prompts = [f"prompt {i}" for i in range(11)]
    responses = [f"response {i}" for i in range(11)]
    with RewardClient(server.target) as client:
        together = client.score(prompts, responses)
        single = [client.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    np.testing.assert_allclose(together, single, atol=1e-5)


def test_a_full_queue_answers_resource_exhausted(serve):
    server = serve("reward", max_queue_size=2)
    with RewardClient(server.target, retries=1) as client:
        with pytest.raises(ResourceExhaustedError, match="max_queue_size 2"):
            client.score(["a", "b", "c"], ["x", "y", "z"])
        assert client.score(["a"], ["x"]).shape == (1,)


def _item(**fields) -> reward_pb2.ScoreItem:
    return reward_pb2.ScoreItem(**fields)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (reward_pb2.ScoreRequest(), r"items: must not be empty"),
        (reward_pb2.ScoreRequest(items=[_item(prompt="", response="r")]), r"items\[0\]"),
        (reward_pb2.ScoreRequest(items=[_item(prompt="p", response="x" * 70000)]),
         r"items\[0\].response: is more than 65536 bytes"),
        (reward_pb2.ScoreRequest(items=[_item(response="r")]), r"items\[0\]: prompt or chat"),
        (reward_pb2.ScoreRequest(items=[_item(prompt="p", response="r")], scorer="nope"),
         r"scorer: unknown scorer 'nope'"),
        (reward_pb2.ScoreRequest(items=[_item(prompt="p", response="r")] * 65),
         r"items: 65 items exceed max_batch_size 64"),
        (reward_pb2.ScoreRequest(items=[_item(prompt="word " * 600, response="r")]),
         r"items\[0\].prompt: .* exceed max_length 512"),
        (reward_pb2.ScoreRequest(items=[
            _item(chat=common_pb2.Conversation(), response="r")]),
         r"items\[0\].chat.messages: must not be empty"),
    ],
)  # fmt: skip
def test_bad_score_requests_are_invalid_arguments_naming_the_field(serve, request_, message):
    server = serve("reward")
    with RewardClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client._call("Score", request_)


def test_bad_compare_requests_name_the_response(serve):
    server = serve("reward")
    request = reward_pb2.CompareRequest(
        items=[reward_pb2.CompareItem(prompt="p", response_a="a", response_b="b" * 70000)]
    )
    with RewardClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"items\[0\].response_b: is more than"):
            client._call("Compare", request)


def test_an_empty_response_is_scored_as_the_prompt_and_the_end_token(serve, reward_model):
    server = serve("reward", model=str(reward_model))
    with RewardClient(server.target) as client:
        (score,) = client.score(["How is the weather?"], [""])
        (probability,) = client.compare(["How is the weather?"], [""], [""])
    assert score == pytest.approx(in_process(reward_model, "How is the weather?", ""), abs=1e-5)
    assert probability == pytest.approx(0.5)
