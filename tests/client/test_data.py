"""Dataset loading for jobs: formats told by path, typed examples, errors that say where."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignd.data import (
    DataError,
    KTOExample,
    PreferencePair,
    PromptOnly,
    SFTExample,
    load_examples,
    split_held_out,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def write_jsonl(path, lines):
    path.write_text(
        "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    )
    return path


def test_jsonl_sft_with_text_and_chat_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Say hi.", "response": "Hi.", "extra": 1},
            "\n",
            {"prompt": CHAT, "response": "Hello."},
        ],
    )
    assert load_examples(path, "sft") == [
        SFTExample("Say hi.", "Hi."),
        SFTExample(CHAT, "Hello."),
    ]


def test_field_names_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    examples = load_examples(path, "sft", fields={"prompt": "question", "response": "answer"})
    assert examples == [SFTExample("2+2?", "4")]
    with pytest.raises(ValueError, match=r"unknown fields \['question'\]"):
        load_examples(path, "sft", fields={"question": "prompt"})


def test_sft_from_a_conversation_splits_off_the_last_assistant_message(tmp_path):
    messages = [*CHAT, {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"messages": CHAT}])
    with pytest.raises(DataError, match="line 2: field 'messages' must end with an assistant"):
        load_examples(path, "sft")
    assert load_examples(path, "sft", limit=1) == [SFTExample(CHAT, "Hello.")]


def test_preferences_accept_text_or_a_single_assistant_message(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q", "chosen": "good", "rejected": "bad"},
            {
                "prompt": CHAT,
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ],
    )
    assert load_examples(path, "preference") == [
        PreferencePair("Q", "good", "bad"),
        PreferencePair(CHAT, "yes", "no"),
    ]


def test_kto_labels_are_booleans_or_zero_one(tmp_path):
    path = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "Q", "completion": "a", "label": True},
            {"prompt": "Q", "completion": "b", "label": 0},
            {"prompt": "Q", "completion": "c", "label": "yes"},
        ],
    )
    with pytest.raises(
        DataError, match=r"line 3: field 'label' must be a boolean or 0/1, got 'yes'"
    ):
        load_examples(path, "kto")
    assert load_examples(path, "kto", limit=2) == [
        KTOExample("Q", "a", True),
        KTOExample("Q", "b", False),
    ]


def test_prompts_carry_an_optional_label(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "label": 4}, {"prompt": CHAT}]
    )
    assert load_examples(path, "prompt") == [PromptOnly("2+2?", "4"), PromptOnly(CHAT)]


def test_a_missing_field_names_the_file_the_line_and_the_field(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q", "chosen": "a", "rejected": "b"},
            "\n",
            {"prompt": "Q", "rejected": "b"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_examples(path, "preference")
    assert str(info.value) == (
        f"{path} line 3: missing field 'chosen' (the record has: prompt, rejected)"
    )
    assert (info.value.path, info.value.location, info.value.field) == (path, "line 3", "chosen")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "", "response": "r"}, "field 'prompt' is empty"),
        ({"prompt": 3, "response": "r"}, "field 'prompt' must be text or chat messages, got int"),
        (
            {"prompt": [{"role": "user"}], "response": "r"},
            r"field 'prompt' message 0 is not a \{role, content\} object",
        ),
        ({"prompt": "p", "response": ""}, "field 'response' is empty"),
        ({"prompt": "p", "response": ["a", "b"]}, "field 'response' must be text, got list"),
        ({"prompt": "p", "response": None}, "missing field 'response'"),
        ([1, 2], "line 1: expected an object, got list"),
    ],
)
def test_bad_values_are_rejected_with_their_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message):
        load_examples(path, "sft")


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "p", "response": "r"}, "{oops\n"])
    with pytest.raises(DataError, match=r"broken.jsonl line 2: invalid JSON"):
        load_examples(path, "sft")


def test_json_array_files_are_read_too(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "p", "response": "r"}, {"prompt": "q"}]))
    with pytest.raises(DataError, match=r"data.json row 1: missing field 'response'"):
        load_examples(path, "sft")


def test_unknown_paths_kinds_and_formats_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        load_examples(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "data.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*data.csv"):
        load_examples(tmp_path / "data.csv", "sft")
    with pytest.raises(ValueError, match="not a directory saved with datasets"):
        load_examples(tmp_path, "sft")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_examples(tmp_path / "data.csv", "dpo")


def test_parquet_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(
        [
            {"prompt": CHAT, "chosen": "good", "rejected": "bad"},
            {"prompt": CHAT, "chosen": None, "rejected": "bad"},
        ]
    )
    parquet.write_table(table, tmp_path / "prefs.parquet")
    with pytest.raises(DataError, match=r"prefs.parquet row 1: missing field 'chosen'"):
        load_examples(tmp_path / "prefs.parquet", "preference")
    examples = load_examples(tmp_path / "prefs.parquet", "preference", limit=1)
    assert examples == [PreferencePair(CHAT, "good", "bad")]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails
    with pytest.raises(ImportError, match=r"data.parquet needs pyarrow: pip install pyarrow"):
        load_examples(tmp_path / "data.parquet", "sft")


def as_dataset(datasets, rows):
    """A ``datasets.Dataset`` of ``rows`` with a fixed fingerprint (skips datasets' hashing)."""
    return datasets.Dataset(datasets.table.InMemoryTable.from_pylist(rows), fingerprint="test")


def test_datasets_directories_with_and_without_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    as_dataset(datasets, [{"prompt": "Q", "completion": "a", "label": True}]).save_to_disk(
        str(tmp_path / "one")
    )
    assert load_examples(tmp_path / "one", "kto") == [KTOExample("Q", "a", True)]
    splits = datasets.DatasetDict(
        {
            "train": as_dataset(datasets, [{"prompt": CHAT, "response": "r"}]),
            "test": as_dataset(datasets, [{"prompt": "t", "response": None}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(tmp_path / "dict", "sft") == [SFTExample(CHAT, "r")]
    with pytest.raises(DataError, match=r"dict row 0: missing field 'response'"):
        load_examples(tmp_path / "dict", "sft", split="test")
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'eval'"):
        load_examples(tmp_path / "dict", "sft", split="eval")


def test_held_out_split_is_deterministic_by_seed():
    examples = [SFTExample(f"p{i}", "r") for i in range(20)]
    train, held = split_held_out(examples, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert split_held_out(examples, 0.25, seed=3) == (train, held)
    assert split_held_out(examples, 0.25, seed=4) != (train, held)
    assert sorted(train + held, key=examples.index) == examples
    assert train == sorted(train, key=examples.index)  # original order kept
    assert len(split_held_out(examples, 7, seed=3)[1]) == 7


def test_held_out_split_by_prompt_keeps_a_prompts_examples_together():
    pairs = [PreferencePair(f"p{i // 3}", f"c{i}", f"r{i}") for i in range(30)]  # 10 prompts
    train, held = split_held_out(pairs, 0.2, seed=0, by_prompt=True)
    assert len(held) == 6  # 2 prompts x 3 pairs
    assert not {p.prompt for p in train} & {p.prompt for p in held}


@pytest.mark.parametrize(
    ("held_out", "message"),
    [
        (0, "cannot hold out 0 of 4"),
        (4, "cannot hold out 4 of 4"),
        (1.5, "fraction in"),
        (True, "fraction in"),
    ],
)
def test_held_out_split_keeps_both_sides_non_empty(held_out, message):
    with pytest.raises(ValueError, match=message):
        split_held_out([PromptOnly(str(i)) for i in range(4)], held_out)


def test_jobs_modules_import_no_torch_and_no_table_libraries():
    code = (
        "import sys, alignd.algorithms, alignd.data, alignd.tasks.sentiment; "
        "print(sorted({'torch', 'pyarrow', 'datasets', 'pandas'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
