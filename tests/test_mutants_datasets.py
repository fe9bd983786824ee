"""Unit tests of orchestra.datasets: items and the JSONL reader's edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestra.datasets import LETTERS, Item, load_dataset
from orchestra.errors import DatasetError
from orchestra.prompts import MAX_TASK_CHARS


def write(tmp_path: Path, *lines: str, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_question_of_exactly_the_longest_length_is_taken() -> None:
    assert Item(id="1", question="q" * MAX_TASK_CHARS, answer="a").question
    with pytest.raises(ValueError):
        Item(id="1", question="q" * (MAX_TASK_CHARS + 1), answer="a")


def test_a_boolean_id_is_not_made_text() -> None:
    with pytest.raises(ValueError):
        Item(id=True, question="q", answer="a")  # type: ignore[arg-type]
    assert Item(id=7, question="q", answer=3).id == "7"  # type: ignore[arg-type]


def test_an_empty_choices_list_is_an_open_question() -> None:
    item = Item(id="1", question="q", answer="Paris", choices=[])  # type: ignore[arg-type]
    assert item.choices is None and item.prompt() == "q"


def test_ten_choices_fit_the_letters_and_eleven_do_not() -> None:
    assert len(Item(id="1", question="q", answer="J", choices=[str(i) for i in range(10)]).choices or ()) == 10
    with pytest.raises(ValueError, match="at most 10"):
        Item(id="1", question="q", answer="A", choices=[str(i) for i in range(11)])
    assert len(LETTERS) == 10


def test_a_letter_answer_in_brackets_is_read() -> None:
    assert Item(id="1", question="q", answer="(B)", choices=["x", "y"]).answer == "(B)"


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": "1", "question": "q", "answer": "a", "answer": "b"}')
    with pytest.raises(DatasetError, match="'answer' is given twice"):
        load_dataset(path)


def test_lines_of_blanks_alone_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"id": "1", "question": "q", "answer": "a"}), "   ", "\t",
                 json.dumps({"id": "2", "question": "q", "answer": "b"}))
    assert [item.id for item in load_dataset(path)] == ["1", "2"]


def test_an_answer_written_as_a_number_keeps_its_digits(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": 1, "question": "q", "answer": 1.50}',
                 '{"id": 2, "question": "q", "answer": 123456789012345678901234567890.0}')
    assert [item.answer for item in load_dataset(path)] == ["1.50", "123456789012345678901234567890.0"]


def test_only_a_first_line_that_is_not_json_gets_the_jsonl_hint(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"id": "1", "question": "q", "answer": "a"}), "id,question,answer",
                 name="d.csv")
    with pytest.raises(DatasetError) as error:
        load_dataset(path)
    assert ":2: not valid JSON" in str(error.value) and "JSON Lines" not in str(error.value)
    with pytest.raises(DatasetError, match="a CSV file is not: convert it"):
        load_dataset(write(tmp_path, "id,question,answer", name="e.csv"))
