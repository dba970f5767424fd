"""The bundled sentiment task: its oracle, its shipped files, and the oracle as a scorer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignd import RewardClient
from alignd.data import PreferencePair, PromptOnly, SFTExample
from alignd.tasks.sentiment import SCORER, TASK_DIR, lexicon, load_task, oracle, oracle_scorer
from alignd.tasks.sentiment.build import FILES, build

REPO = Path(__file__).resolve().parents[2]


def squash(s: float) -> float:
    """The oracle's final step, s / sqrt(s² + 4)."""
    return s / math.sqrt(s * s + 4)


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / FILES[name]).read_text().splitlines()]


# --- the oracle -------------------------------------------------------------------------


def test_positive_beats_neutral_beats_negative():
    positive = oracle("The harbor is lovely in the morning.")
    neutral = oracle("The harbor is busy in the morning.")
    negative = oracle("The harbor is gloomy in the morning.")
    assert positive > neutral > negative
    assert (positive, neutral, negative) == pytest.approx((squash(1), 0.0, squash(-1)))


@pytest.mark.parametrize(
    ("text", "s"),
    [
        ("The ocean is wonderful.", 2.0),  # a strong word counts 2
        ("It was a good day.", 1.0),
        ("It was a very good day.", 1.5),  # intensifier: x 1.5
        ("It was a slightly good day.", 0.5),  # dampener: x 0.5
        ("It was not good.", -0.75),  # negation: x -0.75
        ("It was not bad.", 0.75),
        ("It wasn't terrible at all.", 1.5),  # any n't negates
        ("It isn’t GOOD.", -0.75),  # curly apostrophe, upper case
        ("It was not at all good.", -0.75),  # within three words of the negator
        ("Not one of the days was good.", 1.0),  # more than three words away
        ("Not now, it is good.", 1.0),  # punctuation ends the scope
        ("I do not mind, but it is bad.", -1.0),  # so does "but"
        ("It is good good good.", 1.0 + 0.5 + 0.25),  # repeats decay by half
        ("I love it and hate it.", 2.0 - 2.0),
        ("", 0.0),
    ],
)
def test_oracle_follows_its_rules(text, s):
    assert oracle(text) == pytest.approx(squash(s))


def test_negation_flips_the_sign():
    for word in ("pleasant", "boring", "wonderful", "awful"):
        assert np.sign(oracle(f"It is not {word}.")) == -np.sign(oracle(f"It is {word}."))


def test_scores_stay_inside_minus_one_one():
    assert 0.99 < oracle(" ".join(sorted(lexicon.STRONG_POSITIVE))) < 1.0
    assert -1.0 < oracle(" ".join(sorted(lexicon.STRONG_NEGATIVE))) < -0.99


def test_the_lexicon_is_broad_and_consistent():
    positive = lexicon.POSITIVE | lexicon.STRONG_POSITIVE
    negative = lexicon.NEGATIVE | lexicon.STRONG_NEGATIVE
    assert len(positive) >= 100 and len(negative) >= 100
    assert not positive & negative
    assert not (positive | negative) & (lexicon.NEGATORS | lexicon.INTENSIFIERS)


def test_oracle_scorer_has_the_reward_service_signature():
    chat = [{"role": "user", "content": "Write one sentence about tea."}]
    assert oracle_scorer(chat, "Tea is lovely.", None) == oracle("Tea is lovely.")
    assert oracle_scorer("prompt", "Tea is awful.", "ignored") == oracle("Tea is awful.")
    with pytest.raises(TypeError, match="response must be text"):
        oracle_scorer("prompt", None, None)


def test_the_oracle_scores_through_a_real_reward_service(serve):
    server = serve(
        "reward", model="none", scorers=[f"sentiment={SCORER}"], default_scorer="sentiment"
    )
    prompts = ["Write one sentence about tea.", [{"role": "user", "content": "Describe rain."}]]
    responses = ["Tea is a wonderful, calming drink.", "Rain is not pleasant today."]
    with RewardClient(server.target) as client:
        scores = client.score(prompts, responses, scorer="sentiment")
        default = client.score(prompts[:1], responses[:1])
        info = client.info()
    np.testing.assert_allclose(scores, [oracle(r) for r in responses], rtol=1e-6)
    assert scores[0] > 0 > scores[1]
    assert default.tolist() == scores[:1].tolist()
    assert info.scorers[0].function == SCORER.removeprefix("function:")


# --- the shipped files ------------------------------------------------------------------


def test_shipped_files_regenerate_byte_identically(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_task.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "preferences_eval" in run.stdout
    for name in FILES.values():
        assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes(), name
    check = [sys.executable, str(REPO / "scripts" / "make_task.py"), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 0


def test_another_seed_gives_other_data(tmp_path):
    build(tmp_path, seed=8)
    assert (tmp_path / FILES["sft"]).read_bytes() != (TASK_DIR / FILES["sft"]).read_bytes()


def test_every_preference_pair_is_ordered_by_the_oracle():
    for name in ("preferences_train", "preferences_eval"):
        pairs = records(name)
        assert len(pairs) >= 100
        for pair in pairs:
            assert oracle(pair["chosen"]) > oracle(pair["rejected"]), pair
            assert oracle(pair["chosen"]) == pytest.approx(pair["chosen_oracle"], abs=1e-4)
        difficulties = {p["difficulty"] for p in pairs}
        assert difficulties == {"clear", "moderate", "hard"}


def test_sft_demonstrations_are_neutral_on_average():
    demos = records("sft")
    scores = [oracle(d["response"]) for d in demos]
    assert abs(np.mean(scores)) < 0.05
    assert np.mean([s == 0 for s in scores]) > 0.5
    chosen = [p["chosen_oracle"] for p in records("preferences_train")]
    assert np.mean(chosen) > np.mean(scores) + 0.3  # room to improve


def test_held_out_topics_never_appear_in_training_data():
    held = {r["topic"] for r in records("held_out_prompts")}
    train = {r["topic"] for r in records("train_prompts")}
    assert held and train and not held & train
    train_prompts = {json.dumps(r["prompt"]) for r in records("train_prompts")}
    held_prompts = {json.dumps(r["prompt"]) for r in records("held_out_prompts")}
    for name in ("sft", "preferences_train"):
        assert {json.dumps(r["prompt"]) for r in records(name)} <= train_prompts
    assert {json.dumps(r["prompt"]) for r in records("preferences_eval")} <= held_prompts


def test_load_task_gives_typed_examples():
    task = load_task()
    prompts, held = task.prompts(), task.prompts("held_out")
    assert isinstance(prompts[0], PromptOnly) and prompts[0].prompt[0]["role"] == "user"
    assert (len(prompts), len(held)) == (len(records("train_prompts")), 160)
    assert isinstance(task.sft_examples()[0], SFTExample)
    assert all(isinstance(p, PreferencePair) for p in task.preferences("eval"))
    assert len(task.preferences()) == len(records("preferences_train"))
    with pytest.raises(ValueError, match="unknown preferences split 'test'"):
        task.preferences("test")


def test_load_task_reads_a_generated_directory(tmp_path):
    build(tmp_path)
    assert load_task(tmp_path).sft == tmp_path / FILES["sft"]
    (tmp_path / FILES["sft"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"sft\.jsonl"):
        load_task(tmp_path)


def test_the_task_is_small():
    assert sum((TASK_DIR / name).stat().st_size for name in FILES.values()) < 600 * 1024
