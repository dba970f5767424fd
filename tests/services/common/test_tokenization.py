"""tokenize(): prompt forms, the prompt/completion split, end tokens, truncation, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignd_server.common.errors import InvalidArgument
from alignd_server.common.models import load_tokenizer
from alignd_server.common.tiny import CHAT_VOCAB_SIZE, CORPUS
from alignd_server.common.tokenization import end_token_id, tokenize, tokenize_batch

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok(tiny_models):
    """The tiny chat tokenizer (SmolLM2's special tokens and template), loaded from disk."""
    return load_tokenizer(tiny_models.causal_lm)


@pytest.fixture(scope="module")
def bert_tok(tiny_models):
    """The tiny WordPiece tokenizer: [CLS] text [SEP], no eos, no chat template."""
    return load_tokenizer(tiny_models.classifier)


def _enc(tokenizer, text, special):
    return list(tokenizer.encode(text, add_special_tokens=special))


def test_text_prompt_then_completion_then_eos(tok):
    out = tokenize(tok, "Hello there.", " Paris is nice.", max_length=64)
    prompt, completion = _enc(tok, "Hello there.", True), _enc(tok, " Paris is nice.", False)
    assert out.input_ids.tolist() == [*prompt, *completion, 2]
    assert out.input_ids.dtype == np.int32 and out.loss_mask.dtype == np.uint8
    assert out.prompt_length == len(prompt)
    assert out.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(completion) + 1)
    assert not out.truncated


def test_prompt_alone_has_no_eos_and_no_loss(tok):
    out = tokenize(tok, "Hello there.", max_length=64)
    assert out.input_ids.tolist() == _enc(tok, "Hello there.", True)
    assert out.prompt_length == len(out.input_ids)
    assert not out.loss_mask.any()


def test_chat_prompt_is_rendered_with_the_template_and_generation_prompt(tok):
    out = tokenize(tok, CHAT, "Paris.", max_length=256)
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    expected = _enc(tok, rendered, False)
    assert out.input_ids[: out.prompt_length].tolist() == expected
    assert tok.decode(out.input_ids[: out.prompt_length]).endswith(
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The completion follows the generation prompt directly and ends with <|im_end|>.
    assert tok.decode(out.input_ids[out.prompt_length :]) == "Paris.<|im_end|>"


def test_chat_with_a_system_message_replaces_the_default_one(tok):
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    text = tok.decode(tokenize(tok, chat, max_length=256).input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "SmolLM" not in text


def test_eos_is_not_doubled_when_the_completion_already_ends_with_it(tok):
    out = tokenize(tok, "Hi.", "Bye.<|im_end|>", max_length=64)
    assert out.input_ids.tolist()[-2:] != [2, 2]
    assert out.input_ids[-1] == 2
    assert tokenize(tok, "Hi.", [40, 41, 2], max_length=64).input_ids[-3:].tolist() == [40, 41, 2]


def test_append_eos_false_keeps_the_completion_as_is(tok):
    out = tokenize(tok, "Hi.", "Bye.", max_length=64, append_eos=False)
    assert out.input_ids[out.prompt_length :].tolist() == _enc(tok, "Bye.", False)


def test_empty_completion_is_just_the_end_token(tok):
    out = tokenize(tok, "Hi.", "", max_length=64)
    assert out.input_ids[out.prompt_length :].tolist() == [2]
    assert out.loss_mask.sum() == 1


@pytest.mark.parametrize("ids", [[5, 6, 7], np.array([5, 6, 7], dtype=np.int32), (5, 6, 7)])
def test_token_id_prompts_pass_through(tok, ids):
    out = tokenize(tok, ids, [8, 9], max_length=16)
    assert out.input_ids.tolist() == [5, 6, 7, 8, 9, 2]
    assert out.prompt_length == 3


def test_bert_style_tokenizer_ends_with_sep(bert_tok):
    sep, cls = bert_tok.sep_token_id, bert_tok.cls_token_id
    assert bert_tok.eos_token_id is None and end_token_id(bert_tok) == sep
    out = tokenize(bert_tok, "the question", "the answer", max_length=32)
    ids = out.input_ids.tolist()
    assert ids[0] == cls and ids[out.prompt_length - 1] == sep and ids[-1] == sep
    assert bert_tok.decode(ids) == "[CLS] the question [SEP] the answer [SEP]"


def _full(tok):
    prompt, completion = _enc(tok, CORPUS[2], True), [*_enc(tok, " Paris.", False), 2]
    return prompt, completion


def test_exactly_max_length_is_not_truncated(tok):
    prompt, completion = _full(tok)
    for mode in ("error", "left", "right"):
        out = tokenize(tok, CORPUS[2], " Paris.", max_length=len(prompt) + len(completion))
        assert not out.truncated, mode


def test_truncation_error_names_the_field_and_the_limit(tok):
    prompt, completion = _full(tok)
    total = len(prompt) + len(completion)
    with pytest.raises(InvalidArgument) as excinfo:
        tokenize(tok, CORPUS[2], " Paris.", max_length=10, field="items[2].prompt")
    assert excinfo.value.field == "items[2].prompt"
    assert str(excinfo.value) == (
        f"items[2].prompt: {total} tokens (prompt {len(prompt)} + completion "
        f"{len(completion)}) exceed max_length 10"
    )


def test_left_truncation_drops_the_start_of_the_prompt(tok):
    prompt, completion = _full(tok)
    out = tokenize(tok, CORPUS[2], " Paris.", max_length=8, truncation="left")
    assert out.truncated
    assert out.input_ids.tolist() == (prompt + completion)[-8:]
    assert out.prompt_length == 8 - len(completion)
    assert out.loss_mask.tolist() == [0] * out.prompt_length + [1] * len(completion)


def test_left_truncation_needs_room_for_one_prompt_token(tok):
    _, completion = _full(tok)
    tokenize(tok, CORPUS[2], " Paris.", max_length=len(completion) + 1, truncation="left")
    with pytest.raises(InvalidArgument, match=r"^items\[0\]\.completion: .*no room") as excinfo:
        tokenize_batch(tok, [(CORPUS[2], " Paris.")], max_length=len(completion), truncation="left")
    assert excinfo.value.field == "items[0].completion"


def test_right_truncation_cuts_the_end(tok):
    prompt, completion = _full(tok)
    inside_completion = len(prompt) + 1
    out = tokenize(tok, CORPUS[2], " Paris.", max_length=inside_completion, truncation="right")
    assert out.truncated and out.input_ids.tolist() == (prompt + completion)[:inside_completion]
    assert out.prompt_length == len(prompt) and out.loss_mask.sum() == 1
    out = tokenize(tok, CORPUS[2], " Paris.", max_length=3, truncation="right")
    assert out.input_ids.tolist() == prompt[:3]
    assert out.prompt_length == 3 and not out.loss_mask.any()


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.sampled_from(CORPUS),
    completion=st.sampled_from(CORPUS),
    max_length=st.integers(1, 80),
    truncation=st.sampled_from(["left", "right"]),
)
def test_truncated_results_are_consistent(tok, prompt, completion, max_length, truncation):
    full_prompt, full_completion = _enc(tok, prompt, True), [*_enc(tok, completion, False), 2]
    full = full_prompt + full_completion
    try:
        out = tokenize(tok, prompt, completion, max_length=max_length, truncation=truncation)
    except InvalidArgument:
        assert truncation == "left" and len(full_completion) >= max_length
        return
    ids = out.input_ids.tolist()
    assert len(ids) == min(len(full), max_length) and out.truncated == (len(full) > max_length)
    assert ids == (full[:max_length] if truncation == "right" else full[len(full) - len(ids) :])
    assert out.loss_mask.tolist() == [0] * out.prompt_length + [1] * (len(ids) - out.prompt_length)
    if truncation == "left":
        assert ids[out.prompt_length :] == full_completion


@pytest.mark.parametrize(
    ("prompt", "field", "message"),
    [
        ("", "prompt", "must not be empty"),
        ([], "prompt", "must not be empty"),
        ([{"role": "user", "content": ""}], "prompt[0].content", "non-empty"),
        ([*CHAT, {"role": "", "content": "x"}], "prompt[1].role", "non-empty"),
        ([*CHAT, "hello"], "prompt[1]", "role, content"),
        ([3, 4, CHAT_VOCAB_SIZE], "prompt[2]", f"id {CHAT_VOCAB_SIZE} is outside the vocabulary"),
        ([-1], "prompt[0]", "outside the vocabulary"),
        (np.array([1.0, 2.0]), "prompt", "must be integers"),
        (np.zeros((2, 2), dtype=np.int32), "prompt", "must be 1-D"),
        (None, "prompt", "must be text"),
    ],
)
def test_bad_prompts_name_the_field(tok, prompt, field, message):
    with pytest.raises(InvalidArgument) as excinfo:
        tokenize(tok, prompt, max_length=64)
    assert excinfo.value.field == field
    assert message in str(excinfo.value)


def test_bad_completion_ids_name_the_completion_field(tok):
    with pytest.raises(InvalidArgument) as excinfo:
        tokenize_batch(tok, [("ok", None), ("ok", [1, 999])], max_length=64)
    assert excinfo.value.field == "items[1].completion[1]"


def test_without_a_chat_template_a_chat_reads_as_its_contents(bert_tok):
    as_text = "\n".join(m["content"] for m in CHAT)
    got = tokenize(bert_tok, CHAT, "Fine.", max_length=64)
    want = tokenize(bert_tok, as_text, "Fine.", max_length=64)
    assert got.input_ids.tolist() == want.input_ids.tolist()
    assert got.prompt_length == want.prompt_length


def test_batch_matches_single_calls_and_names_items(tok):
    items = [("Hello.", "Hi."), (CHAT, None), ([5, 6], "Bye.")]
    batch = tokenize_batch(tok, items, max_length=128, truncation="right")
    for (prompt, completion), got in zip(items, batch, strict=True):
        want = tokenize(tok, prompt, completion, max_length=128, truncation="right")
        assert got.input_ids.tolist() == want.input_ids.tolist()
        assert got.prompt_length == want.prompt_length
    with pytest.raises(InvalidArgument, match=r"^items\[1\]\.prompt: must not be empty$"):
        tokenize_batch(tok, [("ok", None), ("", "x")], max_length=64)


def test_server_side_misuse_is_a_value_error(tok):
    with pytest.raises(ValueError, match="truncation"):
        tokenize(tok, "hi", max_length=8, truncation="middle")
    with pytest.raises(ValueError, match="max_length"):
        tokenize(tok, "hi", max_length=0)


@pytest.mark.slow
def test_real_smollm2_tokenizer(prepared_home):
    smol = load_tokenizer(prepared_home / "models" / "smollm2-135m")
    assert tokenize(smol, "Hello world", max_length=8).input_ids.tolist() == [19556, 905]
    out = tokenize(smol, CHAT, "Paris.", max_length=2048)
    expected = smol.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.input_ids[: out.prompt_length].tolist() == _enc(smol, expected, False)
    assert out.input_ids[0] == 1 and out.input_ids[-1] == 2  # <|im_start|> ... <|im_end|>
    assert smol.decode(out.input_ids[out.prompt_length :]) == "Paris.<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize(
    "chat",
    [
        CHAT,
        [{"role": "system", "content": "Be brief."}, *CHAT, {"role": "assistant", "content": "4"}],
    ],
)
def test_tiny_chat_template_renders_like_smollm2(prepared_home, tok, chat):
    smol = load_tokenizer(prepared_home / "models" / "smollm2-135m")
    for generation_prompt in (True, False):
        kwargs = {"add_generation_prompt": generation_prompt, "tokenize": False}
        assert tok.apply_chat_template(chat, **kwargs) == smol.apply_chat_template(chat, **kwargs)


def test_a_chat_template_that_rejects_the_messages_is_an_invalid_argument(tiny_models):
    tokenizer = load_tokenizer(tiny_models.causal_lm)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    chat = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgument, match=r"items\[1\].prompt: the chat template rejected"):
        tokenize(tokenizer, chat, max_length=64, field="items[1].prompt")
