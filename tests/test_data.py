"""Data: every source form loads; every bad input gets an error naming file, row and column;
truncation keeps the end of the prompt and the start of the response; prompts are masked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rto.config.sections import ModelSection
from rto.data.sources import load_rows
from rto.data.tokenize import IGNORE, build_pairs, build_prompts, build_sft, truncate
from rto.errors import DataError
from rto.models.load import load_tokenizer

ROWS = [
    {"prompt": "the food was", "completion": " very good ."},
    {"prompt": "i", "completion": " loved the pizza ."},
]


@pytest.fixture(scope="module")
def base_tok(tiny_task: Path):
    """The built-in task's tokenizer: a base model's, no chat template."""
    return load_tokenizer(ModelSection(path=str(tiny_task / "base_model")))


@pytest.fixture(scope="module")
def tok(chat_task: Path):
    """The built-in task's tokenizer with a simple chat template (<|user|>...</s><|assistant|>)."""
    return load_tokenizer(ModelSection(path=str(chat_task / "base_model")))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(rows_path: Path | str, tok, **kw):
    args = dict(max_length=64, max_prompt_length=16, completion_only=True, source="t")
    args.update(kw)
    return build_sft(load_rows(str(rows_path)), tok, **args)


# --------------------------------------------------------------------------- sources


def test_every_file_form_and_folder_loads_the_same_rows(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS)
    for spec in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved", "folder"):
        rows = load_rows(str(tmp_path / spec))
        assert [dict(r) for r in rows] == ROWS, spec
    both = load_rows(f"{tmp_path / 'a.jsonl'},{tmp_path / 'a.json'}")
    assert len(both) == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "line 2: not valid JSON"),
        ('["not", "an", "object"]\n', "line 1: expected a JSON object"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{f}") + ".*" + re.escape(message)):
        load_rows(str(f))


def test_train_fraction_takes_nested_seeded_shares_and_keeps_the_held_out_rows(
    tmp_path: Path,
) -> None:
    from rto.config.sections import DataSection
    from rto.data.sources import load_train_eval

    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(200)])

    def texts(fraction: float, seed: int = 0, **kw) -> tuple[set, set]:
        data = DataSection(path=str(path), eval_fraction=0.1, train_fraction=fraction, **kw)
        train, held_out = load_train_eval(data, seed)
        return {r["text"] for r in train}, {r["text"] for r in held_out}

    shares = {f: texts(f) for f in (1 / 8, 1 / 4, 1 / 2, 1.0)}
    assert [len(shares[f][0]) for f in sorted(shares)] == [22, 45, 90, 180]
    assert shares[1 / 8][0] < shares[1 / 4][0] < shares[1 / 2][0] < shares[1.0][0]
    assert len({frozenset(h) for _, h in shares.values()}) == 1  # the same 20 held-out rows
    assert texts(1 / 4, seed=1)[0] != shares[1 / 4][0]  # another seed, another share
    assert len(texts(1 / 4, max_rows=100)[0]) == 22  # a share of what max_rows left (90 rows)


def test_a_byte_order_mark_is_ordinary_utf8(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a BOM; the rows are the same as without it."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps(ROWS).encode())
    (tmp_path / "a.csv").write_bytes(bom + b"prompt,completion\nthe food was, very good .\n")
    for spec in ("a.jsonl", "a.json"):
        assert [dict(r) for r in load_rows(str(tmp_path / spec))] == ROWS, spec
    assert load_rows(str(tmp_path / "a.csv")).columns == ["prompt", "completion"]


def test_other_encodings_name_the_line_and_the_likely_encoding(tmp_path: Path) -> None:
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    with pytest.raises(DataError) as err:
        load_rows(str(latin))
    msg = str(err.value)
    assert f"file {latin}, line 2, byte 16" in msg and "not UTF-8 (bytes e9" in msg
    assert "Windows-1252 or Latin-1" in msg and "iconv -f CP1252 -t UTF-8" in msg
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes(json.dumps(ROWS[0]).encode("utf-16"))
    with pytest.raises(DataError, match="looks like UTF-16"):
        load_rows(str(utf16))


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown format; use one of .csv, .json, .jsonl, .parquet"):
        load_rows(str(tmp_path / "x.txt"))


# --------------------------------------------------------------------------- formats


def test_missing_column_lists_columns_and_formats(tmp_path: Path, tok) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        sft(f, tok)
    msg = str(err.value)
    assert (
        str(f) in msg
        and "answer, question" in msg
        and "{text}, {prompt, completion} or {messages}" in msg
    )


def test_non_text_value_names_file_line_and_column(tmp_path: Path, tok) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "a", "completion": 42}])
    with pytest.raises(
        DataError, match=re.escape(f"file {f}, line 2, column 'completion': expected text, got int")
    ):
        sft(f, tok)


def test_preference_missing_column_and_bad_messages(tmp_path: Path, tok) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match="missing column 'rejected'"):
        build_pairs(load_rows(str(f)), tok, max_length=32, max_prompt_length=8, source="t")
    f2 = write_jsonl(
        tmp_path / "p2.jsonl", [{"prompt": "a", "chosen": [{"role": "user"}], "rejected": "c"}]
    )
    with pytest.raises(
        DataError,
        match=r"line 1, column 'chosen', message 0: each message needs 'role' and 'content'",
    ):
        build_pairs(load_rows(str(f2)), tok, max_length=32, max_prompt_length=8, source="t")


def test_messages_need_a_chat_template(tmp_path: Path, tiny_task: Path) -> None:
    tok = load_tokenizer(ModelSection(path=str(tiny_task / "base_model")))  # a base model
    assert tok.chat_template is None
    f = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(DataError, match="has no chat template"):
        sft(f, tok)


def test_messages_train_only_on_assistant_turns(tmp_path: Path, tok) -> None:
    conv = [
        {"role": "user", "content": "the food was"},
        {"role": "assistant", "content": "good ."},
        {"role": "user", "content": "and the staff"},
        {"role": "assistant", "content": "was rude ."},
    ]
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    (ex,), report = sft(f, tok)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    text = tok.decode(trained)
    assert text == "good .</s>was rude .</s>"  # both replies with their end-of-turn, nothing else
    assert tok.decode(ex["input_ids"]).startswith("<|user|>the food was</s><|assistant|>good .")


def test_ultrafeedback_style_conversations(tmp_path: Path, tok) -> None:
    user = {"role": "user", "content": "the food was"}
    row = {
        "prompt": "the food was",
        "chosen": [user, {"role": "assistant", "content": "great ."}],
        "rejected": [user, {"role": "assistant", "content": "bad ."}],
    }
    f = write_jsonl(tmp_path / "uf.jsonl", [row])
    (ex,), _ = build_pairs(load_rows(str(f)), tok, max_length=64, max_prompt_length=32, source="t")
    assert tok.decode(ex["prompt_ids"]) == "<|user|>the food was</s><|assistant|>"
    assert tok.decode(ex["chosen_ids"]) == "great .</s>"
    assert tok.decode(ex["rejected_ids"]) == "bad .</s>"


# --------------------------------------------------------------------------- truncation and masking


def test_truncation_keeps_prompt_end_and_response_start() -> None:
    prompt, response, cut = truncate(
        list(range(10)), list(range(100, 120)), max_prompt=4, max_len=10
    )
    assert prompt == [6, 7, 8, 9] and response == [100, 101, 102, 103, 104, 105] and cut


def test_prompt_is_masked_out_of_the_loss(tmp_path: Path, base_tok) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", ROWS)
    examples, _ = sft(f, base_tok)
    for ex, row in zip(examples, ROWS):
        n_prompt = len(base_tok(row["prompt"], add_special_tokens=False)["input_ids"])
        assert all(lab == IGNORE for lab in ex["labels"][:n_prompt])
        trained = [lab for lab in ex["labels"] if lab != IGNORE]
        assert base_tok.decode(trained) == row["completion"] + "</s>"
    unmasked, _ = sft(f, base_tok, completion_only=False)
    assert all(lab != IGNORE for lab in unmasked[0]["labels"])


def test_empty_rows_are_dropped_and_counted(tmp_path: Path, base_tok) -> None:
    rows = ROWS + [{"prompt": "the food was", "completion": ""}, {"text": ""}]
    f = write_jsonl(
        tmp_path / "e.jsonl",
        [{"prompt": r.get("prompt", ""), "completion": r.get("completion", "")} for r in rows],
    )
    examples, report = sft(f, base_tok)
    assert len(examples) == 2 and report.dropped == {"empty response": 2}
    assert "dropped 2 (2 empty response)" in report.describe()


def test_long_rows_are_truncated_and_counted(tmp_path: Path, base_tok) -> None:
    long_prompt = " ".join(["the food was good ."] * 20)
    f = write_jsonl(
        tmp_path / "l.jsonl", [{"prompt": long_prompt, "completion": " the staff was rude ." * 20}]
    )
    (ex,), report = sft(f, base_tok, max_length=30, max_prompt_length=10)
    assert report.truncated == 1 and len(ex["input_ids"]) == 30
    assert sum(lab == IGNORE for lab in ex["labels"]) == 10
    assert base_tok.decode(ex["input_ids"][:10]).endswith("good .")  # the end of the prompt is kept


def test_identical_and_empty_pairs_are_skipped_and_counted(tmp_path: Path, base_tok) -> None:
    rows = [
        {"prompt": "the food was", "chosen": " good .", "rejected": " bad ."},
        {"prompt": "the food was", "chosen": " good .", "rejected": " good ."},
        {"prompt": "the food was", "chosen": "", "rejected": " bad ."},
        {"prompt": "", "chosen": " good .", "rejected": " bad ."},
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    examples, report = build_pairs(
        load_rows(str(f)), base_tok, max_length=32, max_prompt_length=8, source="t"
    )
    assert len(examples) == 1
    assert report.dropped == {
        "identical chosen and rejected": 1,
        "empty chosen or rejected response": 1,
        "empty prompt": 1,
    }


def test_prompt_rows_long_prompts_keep_their_end(tmp_path: Path, base_tok) -> None:
    f = write_jsonl(
        tmp_path / "pr.jsonl", [{"prompt": "the food was good . " * 10 + "i"}, {"prompt": ""}]
    )
    examples, report = build_prompts(load_rows(str(f)), base_tok, max_prompt_length=6, source="t")
    assert len(examples) == 1 and report.truncated == 1 and report.dropped == {"empty prompt": 1}
    assert base_tok.decode(examples[0]["prompt_ids"]).endswith(". i")


def test_chat_prompts_render_plain_strings_with_the_template(tmp_path: Path, tok) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", ROWS[:1])
    (ex,), _ = sft(f, tok, chat_prompts=True)
    assert tok.decode(ex["input_ids"]) == "<|user|>the food was</s><|assistant|> very good .</s>"
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == " very good .</s>"
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the food was"}])
    (pr,), _ = build_prompts(
        load_rows(str(p)), tok, max_prompt_length=32, source="t", chat_prompts=True
    )
    assert tok.decode(pr["prompt_ids"]) == "<|user|>the food was</s><|assistant|>"
