"""RewardService under malformed requests: every RPC answers with a bad-input code, never
INTERNAL, and afterwards valid requests get exactly the scores they got before. The server
hosts a model scorer without a chat template (the tiny BERT), one with it (the tiny Llama as a
classifier) and a function scorer (the bundled sentiment oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from fuzzing import Fuzzer, budgets, check_counts
from hypothesis import strategies as st
from malformed import (
    ODD_TEXTS,
    chat,
    optional,
    plain_texts,
    raw_requests,
    requests,
    text,
)
from malformed import batch as batch_of

from alignd import RewardClient
from alignd.tasks.sentiment import SCORER as SENTIMENT
from alignd.v1 import reward_pb2

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
MAX_BATCH = 8
SCORERS = ["", "default", "chat", "sentiment"]
FULL = {"Score": 1000, "Compare": 700, "GetInfo": 100}


def scorer(f) -> str:
    return f(
        st.sampled_from(SCORERS),
        st.sampled_from(["missing", "\x00", "x" * 5000, " default", "DEFAULT"]),
    )


def with_prompt(f, item):
    """``item`` with a text or chat prompt, or (wild) none."""
    kind = f(st.sampled_from(["prompt", "chat"]), st.just("none"))
    if kind == "prompt":
        item.prompt = text(f)
    elif kind == "chat":
        item.chat.CopyFrom(chat(f))
    return item


def label(f) -> str | None:
    return f(optional(plain_texts()), st.sampled_from(ODD_TEXTS))


def score_requests() -> st.SearchStrategy[reward_pb2.ScoreRequest]:
    def item(f) -> reward_pb2.ScoreItem:
        return with_prompt(f, reward_pb2.ScoreItem(response=text(f), label=label(f)))

    return requests(
        lambda f: reward_pb2.ScoreRequest(items=batch_of(f, item, MAX_BATCH), scorer=scorer(f))
    )


def compare_requests() -> st.SearchStrategy[reward_pb2.CompareRequest]:
    def item(f) -> reward_pb2.CompareItem:
        return with_prompt(
            f, reward_pb2.CompareItem(response_a=text(f), response_b=text(f), label=label(f))
        )

    return requests(
        lambda f: reward_pb2.CompareRequest(items=batch_of(f, item, MAX_BATCH), scorer=scorer(f))
    )


def answers(client: RewardClient) -> list[np.ndarray]:
    """What valid requests get: scores and preferences of every scorer, text and chat prompts."""
    prompts = ["How was the film?", [{"role": "user", "content": "How was the film?"}]]
    good, bad = ["It was wonderful.", "I loved it."], ["It was awful.", "Dull and long."]
    out = []
    for name in SCORERS[1:]:
        out.append(client.score(prompts, good, scorer=name))
        out.append(client.compare(prompts, good, bad, scorer=name))
    return out


@pytest.mark.parametrize("budget", budgets(FULL))
def test_reward_refuses_malformed_requests_and_scores_valid_ones_unchanged(
    serve, tiny_models, budget
):
    server = serve(
        "reward",
        max_batch_size=MAX_BATCH,
        max_wait_ms=1,
        scorers=[f"chat=model:{tiny_models.causal_lm}", f"sentiment={SENTIMENT}"],
    )
    with RewardClient(server.target) as client, Fuzzer(server.target, SERVICE) as fuzz:
        before = answers(client)
        runs = {"Score": score_requests(), "Compare": compare_requests(), "GetInfo": raw_requests()}
        for method, strategy in runs.items():
            fuzz.run(method, strategy, budget[method], together=4)
            for a, b in zip(answers(client), before, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"after fuzzing {method}")
        check_counts(fuzz, budget)
