"""Data sets: JSONL files of questions with reference answers."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from orchestra.errors import DatasetError
from orchestra.prompts import MAX_TASK_CHARS
from orchestra.terminal_text import invisible

#: the letters of a multiple-choice item's choices, as its prompt lists them and answers are read
LETTERS = "ABCDEFGHIJ"


#: other data sets' names for an item's fields (Hugging Face's ``options``, ``target``, ``label``, ``prompt``)
_OTHER_NAMES = {"options": "choices", "target": "answer", "label": "answer", "prompt": "question"}


def _misspelt_field(row: dict[str, Any]) -> tuple[str, str] | None:
    """A key of ``row`` that is nearly the name of an item field the row lacks (``categroy``), or
    another data set's name for it (``options``), and that field; other keys are extra columns, kept
    as they are."""
    absent = [name for name in Item.model_fields if name not in row]
    for key in row:
        if key not in Item.model_fields:
            other = _OTHER_NAMES.get(key.strip().lower())
            close = [other] if other in absent else difflib.get_close_matches(key, absent, n=1, cutoff=0.8)
            if close:
                return key, close[0]
    return None


class Item(BaseModel):
    """One labelled question: ``{"id", "question", "answer", "choices"?, "category"?}``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    category: str | None = None

    @field_validator("question")
    @classmethod
    def _asked(cls, question: str) -> str:
        """A question with text: blanks alone would be refused as an empty task, with no file or line."""
        if not question.strip():
            raise ValueError("the question is empty")
        if invisible(question):  # (a run refuses it, naming no file or line)
            raise ValueError("the question has no visible character (only spaces, control characters such as NUL "
                             "and format characters such as a zero-width space)")
        if len(question) > MAX_TASK_CHARS:  # (a run refuses it, naming no file or line)
            raise ValueError(f"the question is {len(question):,} characters; at most {MAX_TASK_CHARS:,} fit "
                             "Orchestra's prompts: shorten it")
        return question

    @field_validator("id", "answer", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("category")
    @classmethod
    def _trimmed(cls, category: str | None) -> str | None:
        """A category without surrounding spaces; a blank one is none (it was a row of its own, with a
        blank label, apart from the items without a category)."""
        return category.strip() or None if category is not None else None

    @field_validator("id")
    @classmethod
    def _named(cls, id: str) -> str:
        """An id with text, without surrounding spaces: runs, reports and resumes know an item by it
        ("a" and "a " were two items, told apart by nothing a report shows)."""
        if not id.strip():
            raise ValueError("the id is empty: runs, reports and --resume know an item by its id")
        return id.strip()

    @field_validator("answer")
    @classmethod
    def _answered(cls, answer: str) -> str:
        """A reference answer with text: an empty one could never be graded correct."""
        if not answer.strip():
            raise ValueError("the answer is empty: no reply could be graded correct against it")
        return answer

    @field_validator("choices")
    @classmethod
    def _answer_among_choices(cls, choices: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        """A multiple-choice answer is a letter of its choices, or one of their texts: any other
        could never be graded correct."""
        answer = info.data.get("answer")
        if not choices:  # (an empty list, as a table with a choices column writes it: an open question)
            return None
        blank = next((LETTERS[i] if i < len(LETTERS) else str(i + 1) for i, c in enumerate(choices) if not c.strip()),
                     None)
        if blank is not None:
            raise ValueError(f"choice {blank} is empty")
        if answer is None:
            return choices
        if len(choices) > len(LETTERS):
            raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} (A-{LETTERS[-1]}), the letters answers "
                             "are read in")
        letters = LETTERS[: len(choices)]
        letter, text = answer.strip().strip("()").upper(), answer.strip().lower()
        named = [LETTERS[i] for i, c in enumerate(choices) if c.strip().lower() == text]  # (choices it is the text of)
        if len(letter) == 1 and letter in letters:
            if named and named[0] != letter:  # (which did it mean?)
                raise ValueError(f"the answer {answer!r} is both the letter {letter} and the text of choice "
                                 f"{named[0]}; give the letter of the right choice")
            same = choices[letters.index(letter)].strip().lower()
            twins = [LETTERS[i] for i, c in enumerate(choices) if c.strip().lower() == same and LETTERS[i] != letter]
            if twins:  # (an expert choosing the twin would be graded wrong for the same answer)
                raise ValueError(f"the answer {letter} is a choice whose text is also choice {' and '.join(twins)}'s; "
                                 "make the choices differ")
            return choices
        if len(named) > 1:  # (one of them would be graded wrong)
            raise ValueError(f"the answer {answer!r} is the text of choices {' and '.join(named)}; give the letter of "
                             "the right one")
        if named:
            return choices
        raise ValueError(f"the answer {answer!r} is neither a letter of its {len(choices)} choices "
                         f"({letters[0]}-{letters[-1]}) nor the text of one")

    def prompt(self) -> str:
        """The question with its lettered choices, as experts see it."""
        if not self.choices:
            return self.question
        lines = [f"({LETTERS[i]}) {choice}" for i, choice in enumerate(self.choices)]
        return self.question + "\n" + "\n".join(lines)


@dataclass(frozen=True)
class Dataset:
    """Items read from one file, with the file's sha256 for provenance."""

    items: tuple[Item, ...]
    path: str
    sha256: str

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @classmethod
    def from_items(cls, items: Sequence[Item | dict[str, Any]], *, name: str = "<memory>") -> Dataset:
        """A data set built in code; its hash covers the items' JSON."""
        parsed = tuple(i if isinstance(i, Item) else Item.model_validate(i) for i in items)
        blob = "\n".join(json.dumps(i.model_dump(mode="json"), sort_keys=True) for i in parsed)
        return cls(items=parsed, path=name, sha256=hashlib.sha256(blob.encode()).hexdigest())


def _is_text(value: object) -> bool:
    """Whether ``value`` (a JSON value) encodes as UTF-8: no lone surrogate anywhere in it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _RepeatedKey(Exception):
    """A JSON object names one key twice (``json`` would keep the last silently)."""


class _Written(str):
    """A JSON number as the file writes it: an ``id`` or ``answer`` is that text (``1e999`` read as a
    float was ``inf``, and ``123456789012345678901234567890.0`` lost its digits)."""


#: a JSON number that is an integer as written
_INTEGER = re.compile(r"-?\d+")


def _restored(value: Any) -> Any:
    """``value`` with each written number read as Python reads JSON's (the fields that are not text)."""
    if isinstance(value, _Written):
        return int(value) if _INTEGER.fullmatch(value) else float(value)
    if isinstance(value, list):
        return [_restored(item) for item in value]
    if isinstance(value, dict):
        return {key: _restored(item) for key, item in value.items()}
    return value


class _NotJson(Exception):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's ``json`` reads them, JSON has none of them."""


def _no_constant(name: str) -> Any:
    raise _NotJson(name)


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return row


#: what to say of a data set written as one JSON array
_ARRAY = "; this is a JSON array: a data set is JSON Lines, each object on a line of its own"


def _not_jsonl(file: Path, line: str) -> str:
    """What to say of a first line that is not JSON at all (not an object gone wrong): a data set is
    JSON Lines, and a CSV or plain text file was given."""
    if line.lstrip().startswith("["):  # (a JSON array written over several lines)
        return _ARRAY
    if line.lstrip().startswith("{"):
        return ""
    kind = {".csv": "a CSV file", ".tsv": "a TSV file"}.get(file.suffix.lower(), "this file")
    return (f"; a data set is JSON Lines, one object per line such as "
            f'{{"id": "q1", "question": "...", "answer": "..."}}, and {kind} is not: convert it')


def load_dataset(path: str | Path) -> Dataset:
    """Read a JSONL data set; a bad row is a ``DatasetError`` naming the file and line."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read data set ({error.strerror or error})") from None
    try:  # utf-8-sig: a byte-order mark some editors put first is not part of the first line
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:  # (replacing the bytes would ask the models another question)
        read = error.object  # (after a byte-order mark, which the codec took off)
        where = read[: error.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{where}: not UTF-8 text (byte 0x{read[error.start]:02x}); save the file as "
                           "UTF-8") from None
    items: list[Item] = []
    seen: dict[str, int] = {}
    # (JSON Lines end at LF, CR LF included: ``splitlines`` also cut at U+2028, which JSON holds unescaped)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_once_each, parse_constant=_no_constant, parse_int=_Written,
                             parse_float=_Written)
        except _RepeatedKey as repeated:
            raise DatasetError(f"{path}:{number}: field {repeated.args[0]!r} is given twice; keep one") from None
        except _NotJson as constant:
            raise DatasetError(f"{path}:{number}: {constant.args[0]} is not JSON; write it as a string, in "
                               "quotes") from None
        except json.JSONDecodeError as error:
            hint = "" if items else _not_jsonl(file, line)  # (a file whose first row was JSON is JSON Lines)
            if "\r" in line.rstrip("\r"):  # (one line holding them all: "Extra data" said nothing of why)
                hint = "; its lines end at CR alone (an old Mac's line endings): save it with LF (or CR LF) endings"
            if line.startswith("\ufeff"):  # (Python's own words advised decoding "using utf-8-sig")
                raise DatasetError(f"{path}:{number}: the line begins with a byte-order mark (U+FEFF; files joined "
                                   "with cat?): remove it") from None
            raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg}){hint}") from None
        except RecursionError:
            raise DatasetError(f"{path}:{number}: JSON nested too deeply to read") from None
        if not isinstance(row, dict):
            array = _ARRAY if not items and isinstance(row, list) and row and isinstance(row[0], dict) else ""
            raise DatasetError(f"{path}:{number}: each line must be a JSON object{array}")
        try:  # an id or an answer written as a number is that text; other numbers are numbers
            row = {key: str(value) if key in ("id", "answer") and isinstance(value, _Written) else _restored(value)
                   for key, value in row.items()}
        except ValueError as error:  # an integer of more digits than Python converts (4,300)
            raise DatasetError(f"{path}:{number}: a number too long to read ({str(error).split(':')[0]}); "
                               "write it as a string, in quotes") from None
        if "\\u" in line:  # an escape may stand for half a character, which no model can be sent
            broken = next((name for name, value in row.items() if not _is_text(value)), None)
            if broken is not None:
                raise DatasetError(f"{path}:{number}: field '{broken}' holds a lone surrogate (a \\ud800-style escape "
                                   "that is half a character); write the character itself")
        misspelt = _misspelt_field(row)
        if misspelt is not None:
            raise DatasetError(f"{path}:{number}: unknown field {misspelt[0]!r} (did you mean {misspelt[1]!r}?); "
                               f"a field of another name is kept as it is, not read as {misspelt[1]!r}")
        try:
            item = Item.model_validate(row)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            problem = "missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
            raise DatasetError(f"{path}:{number}: field '{field}': {problem}") from None
        if item.id in seen:
            raise DatasetError(f"{path}:{number}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise DatasetError(f"{path}: the data set has no items")
    return Dataset(items=tuple(items), path=str(path), sha256=hashlib.sha256(raw).hexdigest())
