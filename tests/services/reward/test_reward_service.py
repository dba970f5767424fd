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


def in_process(path, prompt, response, format: str = "alignd") -> float:
    """The same model, one item, no padding, encoded by ``format``'s own convention."""
    loaded = load_sequence_classifier(path)
    tokenizer, model = loaded.tokenizer, loaded.model
    text = prompt
    if isinstance(prompt, list):
        text = "\n".join(m["content"] for m in prompt)
        if loaded.has_chat_template:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    with torch.inference_mode():
        if format == "alignd":  # the trainer's layout; a decoder scores its last token
            chat = isinstance(prompt, list) and loaded.has_chat_template
            ids = tokenize(tokenizer, prompt if chat else text, response, max_length=4096).input_ids
            if hasattr(model, "score"):
                hidden = model.base_model(torch.tensor(ids[None], dtype=torch.long))[0]
                return float(model.score(hidden[0, -1]))
            return float(model(torch.tensor(ids[None], dtype=torch.long)).logits[0, 0])
        if format == "pair":  # tokenizer(prompt, response), token types and all
            encoded = tokenizer(text, response, return_tensors="pt")
        elif format == "concat":  # TRL RewardTrainer, plain text: prompt + response + eos
            whole = text + response
            if tokenizer.eos_token and not whole.endswith(tokenizer.eos_token):
                whole += tokenizer.eos_token
            encoded = tokenizer(whole, return_tensors="pt")
        else:  # chat: TRL RewardTrainer, conversational
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            messages = [*turns, {"role": "assistant", "content": response}]
            encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    return_tensors="pt")  # fmt: skip
        return float(model(**encoded).logits[0, 0])


@pytest.fixture(params=["encoder", "decoder"])
def reward_model(request, tiny_models):
    """A BERT classifier, and a Llama classifier (fresh head on the tiny causal LM, pad = EOS)."""
    return tiny_models.classifier if request.param == "encoder" else tiny_models.causal_lm


def _formats(reward_model, tiny_models) -> list[str]:
    encoder = reward_model == tiny_models.classifier  # its tokenizer has no chat template
    return ["alignd", "pair", "concat"] if encoder else ["alignd", "pair", "concat", "chat"]


def test_scores_equal_an_in_process_forward_in_every_format(serve, reward_model, tiny_models):
    """Each input format scores as the same model does in-process with that format's own
    convention (the text-pair encoding with its token types, one text, the chat template)."""
    for format in _formats(reward_model, tiny_models):
        server = serve("reward", model=str(reward_model), model_format=format)
        with RewardClient(server.target) as client:
            scores = client.score(PROMPTS, RESPONSES)
            chat = client.score([CHAT, CHAT], ["Blue.", ""])
            assert client.info().scorers[0].format == format
        assert scores.dtype == np.float32
        expected = [in_process(reward_model, p, r, format)
                    for p, r in zip(PROMPTS, RESPONSES, strict=True)]  # fmt: skip
        np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0, err_msg=format)
        expected = [in_process(reward_model, CHAT, r, format) for r in ("Blue.", "")]
        np.testing.assert_allclose(chat, expected, atol=1e-5, err_msg=format)


def test_pair_gives_the_response_its_own_token_type(tiny_models):
    """The encoder's text pair: second segment type 1 — what the service feeds it (its
    scores differ from the same tokens with every type 0)."""
    tokenizer = load_sequence_classifier(tiny_models.classifier).tokenizer
    encoded = tokenizer("How is the weather?", "Sunny and warm.")
    types = encoded["token_type_ids"]
    assert types[0] == 0 and types[-1] == 1 and set(types) == {0, 1}
    paired = in_process(tiny_models.classifier, "How is the weather?", "Sunny and warm.", "pair")
    model = load_sequence_classifier(tiny_models.classifier).model
    with torch.inference_mode():
        flat = float(model(torch.tensor([encoded["input_ids"]])).logits[0, 0])
    assert abs(paired - flat) > 1e-4


def test_formats_by_default_follow_the_model_type_and_its_card(serve, tiny_models, tmp_path):
    """No format named: ``pair`` for an encoder, ``chat`` for a decoder with a chat template,
    ``concat`` for one without; the model's ``alignd_reward.json`` overrides that, and the
    flag overrides the card."""
    plain = tmp_path / "plain-decoder"
    shutil.copytree(tiny_models.causal_lm, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for template in plain.glob("chat_template.*"):
        template.unlink()
    carded = tmp_path / "carded"
    shutil.copytree(tiny_models.classifier, carded)
    (carded / "alignd_reward.json").write_text(json.dumps({"format": "concat", "scale": 2.0}))
    scorers = [f"dec=model:{tiny_models.causal_lm}", f"plain=model:{plain}",
               f"card=model:{carded}", f"flag=model:{carded}:alignd"]  # fmt: skip
    server = serve("reward", scorers=scorers)
    with RewardClient(server.target) as client:
        formats = {s.name: s.format for s in client.info().scorers}
        assert formats == {"default": "pair", "dec": "chat", "plain": "concat", "card": "concat",
                           "flag": "alignd"}  # fmt: skip
        got = client.score(PROMPTS[:1], RESPONSES[:1], scorer="card")
    expected = 2.0 * in_process(tiny_models.classifier, PROMPTS[0], RESPONSES[0], "concat")
    np.testing.assert_allclose(got, [expected], atol=1e-5)


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ({"format": "pairs"}, "format 'pairs' is not one of alignd, pair, concat, chat"),
        ({"scael": 2.0}, "scael"),
        ("not json", "alignd_reward.json"),
    ],
)
def test_a_bad_card_is_refused_at_start_up(tiny_models, tmp_path, card, message):
    from alignd_server.common.batching import BatcherMetrics
    from alignd_server.reward.config import RewardSettings
    from alignd_server.reward.scorers import load_scorers

    model = tmp_path / "model"
    shutil.copytree(tiny_models.classifier, model)
    (model / "alignd_reward.json").write_text(card if isinstance(card, str) else json.dumps(card))
    settings = RewardSettings(model=str(model), metrics_port=-1)
    with pytest.raises(ValueError, match=message):
        load_scorers(settings, BatcherMetrics(None))


def test_formats_are_checked_where_they_are_named(tiny_models):
    from alignd_server.common.batching import BatcherMetrics
    from alignd_server.reward.config import RewardSettings
    from alignd_server.reward.scorers import load_scorers

    with pytest.raises(ValueError, match=r"FORMAT 'pairs' is not one of alignd, pair, concat"):
        RewardSettings(scorers=[f"x=model:{tiny_models.classifier}:pairs"])
    with pytest.raises(ValueError, match="model_format"):
        RewardSettings(model_format="pairs")
    encoder = RewardSettings(model=str(tiny_models.classifier), model_format="chat",
                             metrics_port=-1)  # fmt: skip
    with pytest.raises(ValueError, match="format chat needs a chat template"):
        load_scorers(encoder, BatcherMetrics(None))


def test_scores_do_not_depend_on_batch_composition(serve, reward_model, tiny_models):
    item = ("What is two plus two?", "Four.")
    long_items = [("Write a long essay " * 10, "Essay body " * 30)] * 5
    short_items = [("Hi", "Yo"), ("A", "B"), ("Hey", "Hello")]
    for format in _formats(reward_model, tiny_models):
        server = serve("reward", model=str(reward_model), max_wait_ms=20, model_format=format)
        with RewardClient(server.target) as client:
            alone = client.score([item[0]], [item[1]])[0]
            for others in (long_items, short_items):
                batch = [*others[:2], item, *others[2:]]
                scores = client.score([p for p, _ in batch], [r for _, r in batch])
                assert abs(scores[2] - alone) < 1e-5, format


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


def test_an_ensemble_combines_its_members_by_its_formula(serve, oracle_module, tiny_models):
    """``mean``, ``min`` and ``mean_minus_std`` (mean − k · std, std with ddof 0) of the
    members' scores, worked out by hand for two function members, and with a model member;
    ``score_members`` returns each member's scores and the spread."""
    from alignd import EnsembleScores

    length, exact = f"function:{oracle_module}:length", f"function:{oracle_module}:exact"
    server = serve("reward", scorers=[
        f"len={length}", f"exact={exact}", "mean=ensemble:len,exact",
        "low=ensemble:len,exact:min", "safe=ensemble:len,exact:mean_minus_std:0.5",
        "mixed=ensemble:default,len:mean_minus_std",
    ])  # fmt: skip
    prompts, responses, labels = ["q", "q"], ["4", "five"], ["4", "4"]
    # len: 1, 4; exact: 1, 0 -> mean 1, 2; min 1, 0; std 0, 2; mean - 0.5 std: 1, 1
    with RewardClient(server.target) as client:
        for name, want in {"mean": [1.0, 2.0], "low": [1.0, 0.0], "safe": [1.0, 1.0]}.items():
            got = client.score(prompts, responses, scorer=name, labels=labels)
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
        detail = client.score_members(prompts, responses, scorer="safe", labels=labels)
        assert isinstance(detail, EnsembleScores)
        assert list(detail.members) == ["len", "exact"]
        np.testing.assert_array_equal(detail.members["len"], [1.0, 4.0])
        np.testing.assert_array_equal(detail.members["exact"], [1.0, 0.0])
        np.testing.assert_allclose(detail.std, [0.0, 2.0], atol=1e-6)
        np.testing.assert_allclose(detail.scores, [1.0, 1.0], atol=1e-6)
        mixed = client.score_members(PROMPTS, RESPONSES, scorer="mixed")
        model = client.score(PROMPTS, RESPONSES)
        np.testing.assert_array_equal(mixed.members["default"], model)
        lengths = np.array([len(r) for r in RESPONSES], np.float64)
        pair = np.stack([model.astype(np.float64), lengths])
        np.testing.assert_allclose(mixed.scores, pair.mean(0) - pair.std(0), rtol=1e-6)
        np.testing.assert_allclose(
            client.compare(["q"], ["4"], ["five"], scorer="mean", labels=["4"]),
            [1 / (1 + np.exp(-(1.0 - 2.0)))], rtol=1e-6,
        )  # fmt: skip
        info = {s.name: s for s in client.info().scorers}
        assert info["safe"].kind == reward_pb2.SCORER_KIND_ENSEMBLE
        assert list(info["safe"].ensemble.members) == ["len", "exact"]
        assert (info["safe"].ensemble.aggregate, info["safe"].ensemble.k) == ("mean_minus_std", 0.5)
        limits = info["mixed"].limits, info["default"].limits
        assert limits[0].max_sequence_length == limits[1].max_sequence_length
        # a member's error is the request's; return_members needs an ensemble
        with pytest.raises(InvalidArgumentError, match=r"items\[0\].response: scorer 'exact'"):
            client.score(["q"], ["4"], scorer="mean")
        refused = "return_members: scorer 'len' is a function"
        with pytest.raises(InvalidArgumentError, match=refused):
            client.score_members(["q"], ["4"], scorer="len")


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        (["e=ensemble:len"], "two or more distinct members"),
        (["e=ensemble:len,len"], "two or more distinct members"),
        (["e=ensemble:e,len"], "cannot be its own member"),
        (["e=ensemble:len,default:median"], "AGGREGATE 'median' is not one of mean, min"),
        (["e=ensemble:len,default:mean:2"], "K goes with mean_minus_std only"),
        (["e=ensemble:len,default:mean_minus_std:x"], "K 'x' is not a number"),
        (["e=ensemble:len,default:mean_minus_std:-1"], r"K must be in \[0, 100\]"),
    ],
)
def test_ensemble_specs_are_checked(scorers, message):
    from alignd_server.reward.config import RewardSettings

    with pytest.raises(ValueError, match=message):
        RewardSettings(scorers=scorers)


def test_ensemble_members_must_exist_and_not_be_ensembles(oracle_module):
    from alignd_server.common.batching import BatcherMetrics
    from alignd_server.reward.config import RewardSettings
    from alignd_server.reward.scorers import load_scorers

    length = f"len=function:{oracle_module}:length"
    for scorers, message in (
        ([length, "e=ensemble:len,nope"], "member 'nope' is not one of"),
        (
            [
                length,
                f"two=function:{oracle_module}:exact",
                "e=ensemble:len,two",
                "f=ensemble:e,len",
            ],
            "member 'e' is an ensemble",
        ),
    ):
        settings = RewardSettings(model="none", scorers=scorers, default_scorer="len",
                                  metrics_port=-1)  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_scorers(settings, BatcherMetrics(None))


def test_each_scorer_has_its_own_request_item_latency_and_error_series(serve, oracle_module):
    from service_metrics import scrape

    server = serve("reward", scorers=[f"exact=function:{oracle_module}:exact"])
    with RewardClient(server.target) as client:
        client.score(PROMPTS, RESPONSES)
        client.compare(["q"], ["a"], ["b"])
        client.score(["q"], ["4"], scorer="exact", labels=["4"])
        with pytest.raises(InvalidArgumentError):
            client.score(["q"], ["4"], scorer="exact")  # no label: the scorer refuses it
    samples = scrape(server)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    requests = "alignd_reward_scorer_requests_total"
    assert value(requests, scorer="default", method="Score", code="OK") == 1
    assert value(requests, scorer="default", method="Compare", code="OK") == 1
    assert value(requests, scorer="exact", method="Score", code="OK") == 1
    assert value(requests, scorer="exact", method="Score", code="INVALID_ARGUMENT") == 1
    assert value("alignd_reward_scorer_items_total", scorer="default") == len(PROMPTS) + 2
    assert value("alignd_reward_scorer_items_total", scorer="exact") == 1  # failures: none
    assert value("alignd_reward_scorer_seconds_count", scorer="exact", method="Score") == 2
    assert value("alignd_reward_scorer_seconds_sum", scorer="default", method="Score") > 0


def test_the_largest_request_is_stated_and_enforced_in_items_and_bytes(serve):
    """GetInfo's limits say how many items and bytes one request may carry; a request over
    either is refused (items: INVALID_ARGUMENT naming them; bytes: RESOURCE_EXHAUSTED, gRPC's
    own message limit) and the server goes on serving."""
    server = serve("reward", max_batch_size=8, max_message_bytes=4 << 20)
    with RewardClient(server.target) as client:
        limits = client.info().server.limits
        assert (limits.max_batch_size, limits.max_message_bytes) == (8, 4 << 20)
        items = [reward_pb2.ScoreItem(prompt="p", response="r")] * 9
        with pytest.raises(InvalidArgumentError, match="items: 9 items exceed max_batch_size 8"):
            client._call("Score", reward_pb2.ScoreRequest(items=items))
        big = [reward_pb2.ScoreItem(prompt="p", response="r" * (1 << 20))] * 5  # > 4 MiB
        with pytest.raises(ResourceExhaustedError):
            client._call("Score", reward_pb2.ScoreRequest(items=big))
        assert client.score(["p"], ["r"]).shape == (1,)


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
    """In the trainer's layout (``alignd``); the other formats score an empty response by
    their own conventions (test_scores_equal_an_in_process_forward_in_every_format)."""
    server = serve("reward", model=str(reward_model), model_format="alignd")
    with RewardClient(server.target) as client:
        (score,) = client.score(["How is the weather?"], [""])
        (probability,) = client.compare(["How is the weather?"], [""], [""])
    assert score == pytest.approx(in_process(reward_model, "How is the weather?", ""), abs=1e-5)
    assert probability == pytest.approx(0.5)
