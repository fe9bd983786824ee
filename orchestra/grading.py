"""Grading answers against references: multiple-choice letters, numbers, and exact match."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Protocol

from orchestra.datasets import LETTERS, Item
from orchestra.errors import ConfigError

_LONE_LETTER = re.compile(r"\(?[A-Ja-j]\)?")
_BARE_LETTER = re.compile(r"\(?[A-J]\)?")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Drop ``<think>...</think>`` blocks, and everything before a dangling ``</think>``."""
    if "</" not in text:  # no closing tag: nothing to drop (most answers; this runs on each of them)
        return text.strip()
    text = _THINK.sub("", text)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>"):]
    return text.strip()


def answer_text(text: str) -> str:
    """What a grader reads of an answer: its reasoning stripped and, of a JSON object (a step with an
    ``output:`` schema), its ``answer`` field, or its one field, else the object on one line with its
    keys in order (graded and voted on as a whole: "A" inside `{"answer": "A"}` was never read, every
    such answer graded wrong, and a vote over them fell back to the strongest expert unsaid)."""
    text = strip_reasoning(text)
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(value, dict):
        return text
    field = next((item for name, item in value.items() if name.lower() == "answer"),
                 next(iter(value.values())) if len(value) == 1 else None)
    if isinstance(field, (str, int, float)) and not isinstance(field, bool):
        return str(field)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


class Grader(Protocol):
    """Extracts a final answer from a response and checks it against an item."""

    name: str

    def extract(self, text: str, item: Item | None = None) -> str | None:
        """The canonical final answer in ``text``, or None when there is none."""

    def grade(self, text: str, item: Item) -> bool:
        """Whether ``text`` answers ``item`` correctly."""


# "the answer is", "Answer:", "The best answer is"...; not "its answer is 4" or "a wrong answer is",
# which speak of something else (Python's lookbehinds are of a fixed width: one per word)
_ANSWER_IS = re.compile("".join(rf"(?<!\b{word} )" for word in ("its", "his", "her", "their", "your", "wrong",
                                                                 "incorrect", "an"))
                        + r"\banswer[\s*_]*(?:is|:)\s*", re.IGNORECASE)

#: a stop that may end a clause's sentence: then a space or the end ("2.5" and "1,000" go on)
_SENTENCE_END = re.compile(r"[.!?;](?:\s|$)")
#: words a full stop follows without ending a sentence
_ABBREVIATIONS = frozenset({"approx", "ca", "cf", "co", "dr", "e.g", "eq", "etc", "fig", "ft", "i.e", "in", "inc",
                            "jr", "ltd", "mr", "mrs", "ms", "mt", "no", "prof", "sr", "st", "vol", "vs"})


def _sentence(line: str) -> str:
    """``line`` to the end of its first sentence; a stop after an abbreviation ("Dr.", "approx.") or
    an initial ("J. K. Rowling"), or before a word in lower case ("E. coli"), goes on."""
    for end in _SENTENCE_END.finditer(line):
        if line[end.start()] == ".":
            before = line[:end.start()].split()
            word = before[-1].lstrip("(*_\"'").lower() if before else ""
            rest = line[end.end():].lstrip()
            if (word in _ABBREVIATIONS or rest[:1].islower()
                    or (len(word) == 1 and word.isalpha() and _initial_follows(rest))):
                continue
        return line[:end.start()]
    return line


def _initial_follows(rest: str) -> bool:
    """Whether the text after "X. " goes on with a name ("K. Rowling", "Einstein"), not a sentence
    ("A is wrong", "It is")."""
    words = rest.split(maxsplit=2)
    if not words or not words[0][:1].isupper():
        return False
    if len(words[0].rstrip(".")) == 1:  # another initial, or a letter that opens a sentence ("A is wrong")
        return words[0].endswith(".")
    return len(words) < 2 or words[1][:1].isupper() or not words[0].isalpha()


def _answer_clause(text: str) -> str | None:
    """What follows the last "the answer is" (or "Answer:") with text after it, to the end of its
    sentence: a reply that corrects itself on one line ("I thought the answer is 5, but the answer
    is 7") or repeats the question's own "the answer is" before its answer is read by its final
    word, and one that explains itself after ("The answer is Paris. It is the capital.") by its answer."""
    for found in reversed(list(_ANSWER_IS.finditer(text))):
        clause = _sentence(text[found.end():].split("\n", 1)[0]).strip()
        if clause:
            return clause
    return None


#: where a reply speaks of another's answer, or a wrong one ("Their answer is 4", "A wrong answer is (B)")
_OTHERS_ANSWER = re.compile(r"(?:\b(?:a|an|the)\s+)?\b(?:its|his|her|their|your|wrong|incorrect|an)\s+answer"
                            r"[\s*_]*(?:is|:)\s*", re.IGNORECASE)  # (with its article: "A wrong..." is no option A)


def _without_others(text: str) -> str:
    """``text`` without the sentences that state another's or a wrong answer, for reading a reply
    with no answer clause by its last number, letter or line ("A wrong answer is 4." was graded
    right for 4: that clause is not the reply's, and the number then read was its)."""
    if "answer" not in text.lower():
        return text
    for found in reversed(list(_OTHERS_ANSWER.finditer(text))):
        line_end = text.find("\n", found.end())
        line = text[found.end():] if line_end < 0 else text[found.end():line_end]
        said = _sentence(line)
        instead = _INSTEAD.search(said)  # (to what it says instead: "Their answer is 5, but the right one is 7")
        text = text[:found.start()] + text[found.end() + (instead.start() if instead else len(said)):]
    return text


#: a clause that denies ("not 42", "n't B"), and what it may say instead after it ("..., but 43", "it is C")
_DENIAL = re.compile(r"(?:not|n['\u2019]t)\b")
_INSTEAD = re.compile(r"\b(?:but|rather|instead|it is|it's|it\u2019s)\b[\s:,]*", re.IGNORECASE)


def _affirmed(clause: str) -> str | None:
    """What a number or letter clause affirms: itself, or of one that denies ("not 42", "n't B"), what
    it says instead ("not 42, but 43": "43"); None if it only denies ("The answer is not 42." was
    graded right for 42, and voted for it)."""
    if not _DENIAL.match(clause):
        return clause
    instead = list(_INSTEAD.finditer(clause))
    rest = clause[instead[-1].end():].strip() if instead else ""
    return rest or None


def _named_choices(text: str, choices: Sequence[str]) -> list[tuple[int, int, int]]:
    """Where ``text`` names a choice by its text, as whole words or a whole number ("4" is not named in
    "14" nor in "4.5"), as (start, end, index) in order; a name inside a longer choice's ("York" in
    "New York") is that one's."""
    found = [(name.start(), name.end(), index) for index, choice in enumerate(choices) if choice.strip()
             for name in re.finditer(rf"(?<!\w)(?<!\d[.,]){re.escape(choice.strip())}(?!\w|[.,]\d)", text,
                                     re.IGNORECASE)]
    named, reach = [], (-1, -1)  # (the span that reaches furthest yet)
    for name in sorted(found, key=lambda name: (name[0], name[0] - name[1], name[2])):
        if name[1] > reach[1]:
            reach = name[:2]
        elif name[:2] != reach:
            continue  # inside a longer name that starts before it, or with it
        named.append(name)
    return named


def _letters_outside(pattern: str, text: str, named: Sequence[tuple[int, int, int]]) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` in ``text`` outside the choices it names: the "C" of "Vitamin C" is not
    option C where "Vitamin C" is a choice."""
    return (match for match in re.finditer(pattern, text)
            if not any(start <= match.start() < end for start, end, _ in named))


def _chosen_letter(clause: str, valid: str, choices: Sequence[str] = ()) -> str | None:
    """The option an answer clause names: one it opens with ("b) 42", "option b.", "(C)", or a choice's
    text: "green, not A", "14." but not the "2" of "2 + 2 = 4"), else the first "(c)" or standalone
    capital letter in it ("I'd" and the article "a" are words, not options), else a clause that is a
    single letter of either case, else the last choice's text it names (what "2 + 2 = 4" comes to)."""
    opening = re.match(rf"[\s*_]*(?:option|choice)?\s*\(?([{valid}{valid.lower()}])(?:\)|(?=[.,:;]|$))", clause,
                       re.IGNORECASE)
    if opening:
        return opening.group(1).upper()
    named = _named_choices(clause, choices)
    lead = len(clause) - len(clause.lstrip(" *_$("))
    if named and named[0][0] == lead and not re.match(r"\s*[-+*/^=\u00d7\u00b7\u00f7]", clause[named[0][1]:]):
        return LETTERS[named[0][2]]
    match = next(_letters_outside(rf"\(([{valid}{valid.lower()}])\)|\b([{valid}])\b(?!['’])", clause, named), None)
    if match:
        return (match.group(1) or match.group(2)).upper()
    lone = clause.strip(" *_.:()")
    if len(lone) == 1 and lone.upper() in valid:
        return lone.upper()
    return LETTERS[named[-1][2]] if named else None


class MultipleChoiceGrader:
    """Letters A-J: "The answer is (X)", else the last ``\\boxed{X}``, else the last standalone option
    letter; a choice's text stands for its letter."""

    name = "mc"

    def extract(self, text: str, item: Item | None = None) -> str | None:
        """The chosen letter, upper case."""
        text = answer_text(text)
        valid = LETTERS[: len(item.choices)] if item is not None and item.choices else LETTERS
        choices = item.choices if item is not None and item.choices else ()
        clause = _answer_clause(text)
        if clause is not None:
            clause = _affirmed(clause)
            if clause is None:  # it names no letter but one it rules out
                return None
        for stated in ((_unboxed(clause) or clause) if clause else None, _unboxed(text)):
            chosen = _chosen_letter(stated, valid, choices) if stated else None
            if chosen:
                return chosen
        text = _without_others(text)
        named = _named_choices(text, choices)
        letters = list(_letters_outside(rf"\(([{valid}])\)|\b([{valid}])\b(?=[).:\s]|$)", text, named))
        if letters:
            return letters[-1].group(1) or letters[-1].group(2)
        return LETTERS[named[-1][2]] if named else None

    @staticmethod
    def reference(item: Item) -> str:
        """The letter the item's answer names (a choice's text turned into its letter)."""
        reference = item.answer.strip().strip("()").upper()
        if item.choices and not (len(reference) == 1 and reference in LETTERS[: len(item.choices)]):
            # (a one-letter text too: "y" of choices x, y, z is B, not the letter Y)
            matches = [i for i, c in enumerate(item.choices) if c.strip().lower() == item.answer.strip().lower()]
            reference = LETTERS[matches[0]] if matches else reference
        return reference

    def grade(self, text: str, item: Item) -> bool:
        """Compare letters; a reference given as the choice's text is turned into its letter."""
        return self.extract(text, item) == self.reference(item)


_BOXED = re.compile(r"\\boxed\s*\{")


def states_answer(text: str) -> bool:
    """Whether a reply states its answer as ``answer_format`` asks: "the answer is ..." (or
    "Answer: ...") or a ``\\boxed{...}`` answer, outside its reasoning."""
    text = strip_reasoning(text)
    return _answer_clause(text) is not None or last_boxed(text) is not None


#: a LaTeX wrapper around text, such as ``\text{B}``
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _unboxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, with its ``\\text{}``-like wrappers
    dropped (``\\boxed{\\text{B}}`` is ``B``), or None."""
    boxed = last_boxed(text)
    return None if boxed is None else _WRAPPER.sub(r"\1", boxed).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None


#: a sign written with another character than ASCII's hyphen-minus: the minus sign (models write "−5"),
#: a figure or en dash, the small or the fullwidth minus, before a number (a space between them too,
#: "− 5"), and not after a word or a number ("3–5" is a range, not 3 and -5)
_MINUS = re.compile(r"(?<![\w.])[\u2212\u2012\u2013\ufe63\uff0d][ \u00a0\u2009\u202f]?(?=\.?\d)")
#: a degree sign, as text or LaTeX writes it
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\u00b0|\\degree)")
#: a number whose commas group thousands, or with none: "2,3" is the numbers 2 and 3, not 23
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_COMMA_GROUPED = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
#: an answer clause that opens with a range or a choice of two numbers ("3-5", "3 to 5", "3, or 4"): not
#: a restatement of one ("0.5 or 1/2", told apart by value), a date or "3-4-5", a sum ("7 - 3") or "10^3"
_HEDGED = re.compile(r"\W{0,3}(?:about |approximately |roughly |around )?(?:(?P<between>between )\$?)?\$?"
                     rf"({_PLAIN}(?:/\d+)?)"
                     r"(?(between)\s+and\s+|(?:[-\u2012\u2013\u2014~]|\s+[\u2013\u2014~]\s+|\s+to\s+|"
                     r",?\s+\(?or\s+(?:maybe |perhaps |possibly )?|,(?!\d{3}(?!\d))\s*|\s+and\s+(?!\d+\s*/\s*\d)))"
                     rf"\$?(-?{_PLAIN}(?:/\d+)?)(?![\d^*]|[-\u2013/]\d)")
#: a fraction: ``\frac{a}{b}``, ``\dfrac``, ``\tfrac``, and brace-less digits (``\frac12`` is a half)
_FRAC = re.compile(r"-?\\[dt]?frac\s*(?:\{(-?[\d.]+)\}|(\d))\s*(?:\{(-?[\d.]+)\}|(\d))")
#: thousands grouped by spaces, as SI writes them ("1 000 000"; a thin or no-break space too)
_GROUPED = r"-?\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?:\.\d+)?(?![\d,]|\.\d|/\d)"
#: scientific notation: "6.02 × 10^23", "2 x 10^{5}", "1.5 \times 10^{-3}", "6.02e23"
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:[x\u00d7*\u00b7]|\\times|\\cdot)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?"
                         r"|(-?\d+(?:\.\d+)?[eE][-+]?\d+)(?![\w.])"
                         r"|(?<![\d.])10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?(?![\d^])")  # (10^6 is a million; 2^10 no number)
#: a whole number and a fraction: "3 and 1/2" is 7/2
_MIXED = re.compile(r"(?<!between )(-?\d+)(?:\s+and\s+|[ \u00a0])(\d+)\s*/\s*(\d+)")  # ("between 1 and 3/2" is a range)
_NUMBER = re.compile(rf"{_SCIENTIFIC.pattern}|{_MIXED.pattern}|{_FRAC.pattern}|{_GROUPED}"
                     rf"|-?{_PLAIN}(?:\s*/\s*\d+)?|-?\.\d+")
#: a number that is part of an expression, not the answer itself: a power's base or exponent ("2^10"),
#: or what a root or logarithm is taken of ("\sqrt{2}", "√2", "\log_2 8"), a whole number's fraction ("2½"),
#: or a variable's coefficient ("4x", "3i", "2n"; "5k" too, which may be 5,000: no number is stated rather
#: than a wrong one)
_POWER_AFTER = re.compile(r"\s*(?:\^|[\u221a\u00d7\u00b7\u03c0\u00bc-\u00be\u2150-\u215e]|\\(?:sqrt|pi|cdot|times)\b"
                          r"|\*\s*[\d(])|[ijknxyz](?![a-zA-Z])")
_APPLIED_BEFORE = re.compile(r"(?:\^\s*\{?|\\(?:sqrt|log|ln|sin|cos|tan|exp)\b(?:\s*\[[^\]]*\])?[\s_{]*|\u221a\s*)$")
#: a term of an equation: a number, a one-letter variable or a LaTeX command with its arguments, in brackets or not
_TERM = r"[(\[{]*-?(?:\d[\d,]*(?:\.\d+)?|\.\d+|[a-zA-Z](?![a-zA-Z])|\\[a-zA-Z]+(?:\s*\{[^{}]*\})*)[)\]}]*"
_OPERATOR = r"(?:[-+*/^\u00d7\u00b7\u00f7]|\\times|\\cdot|\\div)"
#: the sides of an equation an answer clause opens with, to its last "=": "5 - 3 = ", "x = 2 + 3 = "
_EQUATION = re.compile(rf"[\s$*_]*(?:{_TERM}(?:\s*{_OPERATOR}\s*{_TERM})*\s*=\s*)+")


#: a word that scales the number before it
_SCALES = {"hundred": 10 ** 2, "thousand": 10 ** 3, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12}
_SCALE = re.compile(rf"\s+({'|'.join(_SCALES)})\b", re.IGNORECASE)


def _comes_to(rest: str) -> bool:
    """Whether what follows an equation's last "=" is one number, what it comes to ("5 - 3 = 2"), not
    more working ("6 = 2 * 3" answers 6)."""
    number = _NUMBER.match(rest.lstrip(" $"))
    return number is not None and not re.match(rf"\s*(?:{_OPERATOR}|=|\d)", rest.lstrip(" $")[number.end():])


def _in_expression(text: str, number: re.Match[str]) -> bool:
    """Whether ``number`` in ``text`` is a power's base or exponent, or what a root or logarithm is
    taken of, rather than a number the text states."""
    return bool(_POWER_AFTER.match(text, number.end()) or _APPLIED_BEFORE.search(text[:number.start()]))


#: a number no answer states: an exponent of over 3 digits, or over 300 digits in a row (reading one took
#: minutes, then failed: Python writes no integer of over 4,300 digits)
_TOO_BIG = re.compile(r"(?:[eE]|\^\s*\{?\s*)[-+]?\d{4}|\d{301}")


#: superscript digits ("10⁵", "10⁻³"), read as a power
_SUPERSCRIPT = re.compile("[\u207b\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+")
_SUPERSCRIPT_DIGITS = str.maketrans("\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "-0123456789")
#: a line that denies what follows ("Not 42.", "It isn't 42", "It is not 42")
_BARE_DENIAL = re.compile(r"\W*(?:it\s+is\s+|it['\u2019]s\s+|it\s+)?(?:not|isn['\u2019]t)\b", re.IGNORECASE)


def _no_one_number(text: str) -> bool:
    """Whether a reply with no answer clause is, on its last line, no one number: two of them ("4, 5",
    "3-5", "4 or 5", "between 4 and 5", and nothing after), or a denial ("Not 42.") saying nothing instead."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    hedged = _HEDGED.match(last)
    if hedged and not last[hedged.end():].strip(" .!)]") and normalize_number(hedged[2]) != normalize_number(hedged[3]):
        return True
    denial = _BARE_DENIAL.match(last)
    return denial is not None and not _INSTEAD.search(last, denial.end())  # ("Not 42, but 43." says 43)


def normalize_number(text: str) -> Fraction | None:
    """A number from text: commas, ``$``/``%``, trailing zeros, ``a/b`` and ``\\frac{a}{b}`` (``\\tfrac``,
    ``\\frac12``) handled."""
    text = _MINUS.sub("-", text.strip()).replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    text = _DEGREES.sub("", text)  # ("90^\circ" and "90°" are 90)
    if _TOO_BIG.search(text):
        return None  # (1e50000000 took 88 s to read, and its digits could not be written)
    mixed = _MIXED.fullmatch(text)
    if mixed and int(mixed[3]):
        whole = Fraction(mixed[1])
        return whole + Fraction(int(mixed[2]), int(mixed[3])) * (-1 if mixed[1].startswith("-") else 1)
    scientific = _SCIENTIFIC.fullmatch(text)
    if scientific and scientific[1]:
        return Fraction(scientific[1]) * Fraction(10) ** int(scientific[2])
    if scientific and scientific[4]:
        return Fraction(10) ** int(scientific[4])
    frac = _FRAC.fullmatch(text)
    if frac:
        try:
            value = Fraction(frac[1] or frac[2]) / Fraction(frac[3] or frac[4])
        except (ValueError, ZeroDivisionError):
            return None
        return -value if text.startswith("-") else value  # (a sign before the fraction and one inside cancel)
    text = re.sub(r"\s*/\s*", "/", text.rstrip("."))  # ("1 / 2" is a half)
    if "," in text:
        if not _COMMA_GROUPED.fullmatch(text):
            return None  # ("2,3" is two numbers, "(1,2)" a pair: neither is 23 nor 12)
        text = text.replace(",", "")
    if re.fullmatch(_GROUPED, text):
        text = re.sub(r"[ \u00a0\u2009\u202f]", "", text)
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


class NumericGrader:
    """Numbers: the last ``\\boxed{}``, else the first number after the last "the answer is" (after the
    last "=" of an equation it opens with), else the last number in the text."""

    name = "numeric"

    def extract(self, text: str, item: Item | None = None) -> str | None:
        """The final number, normalised (``"1/2"``, ``"12"``), or None."""
        text = _SUPERSCRIPT.sub(lambda power: "^" + power[0].translate(_SUPERSCRIPT_DIGITS),
                                _MINUS.sub("-", answer_text(text)))  # ("2 × 10⁵" was read as 10)
        # "The answer is 63 (from 100 - 37)": the answer is the number the clause starts with, or the number
        # an equation it opens with comes to ("The answer is 5 - 3 = 2" is 2)
        clause = _answer_clause(text)
        if clause is None and not last_boxed(text) and _no_one_number(text):
            return None  # a bare "4, 5", "3-5", "between 4 and 5" or "Not 42." (its last number got the credit)
        affirmed = _affirmed(clause) if clause is not None else None
        if affirmed is not None:  # ("The answer is - 5": a sign set apart, as some write it, was dropped: 5)
            affirmed = re.sub(r"^([*_$(\s]*)-\s+(?=\.?\d)", r"\1-", affirmed)
        # a clause that only rules a number out ("The answer is not 42.") answers nothing: not its number,
        # nor the text's last one
        rest = [] if clause is not None and affirmed is None else [(affirmed, 0), (_without_others(text), -1)]
        for candidate, pick in ((last_boxed(text), -1), *rest):
            if not candidate:
                continue
            equation = _EQUATION.match(candidate) if pick == 0 else None
            if equation and _comes_to(candidate[equation.end():]):
                candidate = candidate[equation.end():]
            hedged = _HEDGED.match(candidate) if pick == 0 else None
            if hedged and normalize_number(hedged[2]) != normalize_number(hedged[3]):  # no one answer: "3 or 4"
                return None  # (its first number got the credit)
            value = normalize_number(candidate)
            if value is None:
                numbers = list(_NUMBER.finditer(candidate))
                if numbers and _in_expression(candidate, numbers[pick]):
                    return None  # ("\sqrt{2}" read as 2, "2^10" as 2: an answer no number states)
                value = normalize_number(numbers[pick][0]) if numbers else None
                scale = _SCALE.match(candidate, numbers[pick].end()) if numbers else None
                if value is not None and scale:  # "1.5 million" is 1500000, not 1.5
                    value = value * _SCALES[scale[1].lower()]
            if value is not None:
                return str(value)
        return None

    def grade(self, text: str, item: Item) -> bool:
        """Equal as exact fractions (so 0.50, 1/2 and \\frac{1}{2} agree)."""
        extracted = self.extract(text, item)
        reference = normalize_number(item.answer)
        return extracted is not None and reference is not None and Fraction(extracted) == reference


#: punctuation dropped from a text: all but a sign, decimal point or fraction bar of a number ("-3", "1.2", "1/2")
#: (CJK and typographic punctuation too: "東京。" is "東京", "«oui»" "oui")
_WIDE_PUNCTUATION = ("\u3002\uff0c\u3001\uff01\uff1f\uff1a\uff1b\u300c\u300d\u300e\u300f\uff08\uff09\u3010\u3011"
                     "\u300a\u300b\u2026\u2018\u2019\u201c\u201d\u00ab\u00bb\u00bf\u00a1")
_PUNCTUATION = re.compile(rf"(?!(?<=\d)[-./]\d|(?<![\w.-])-\.?\d|(?<![\w.])\.\d)"
                          rf"[{re.escape(string.punctuation)}{_WIDE_PUNCTUATION}]")


#: the operators that make an expression what it is, kept (the spaces around a binary one dropped):
#: "x+1" is not "x-1", nor "n>3" "n<3", nor "10^3" "103" (each was read alike, right in eval and one
#: answer in a vote); "*" and "/" between terms (not markdown's "**"), ":" between digits ("12:30"),
#: "-" between terms ("x - 1", "x-1", "a-b"; not a word's hyphen: "e-mail" is "email") or before a letter or
#: bracket ("-x"; a number's sign is kept anyway)
_OPERATORS = (r"\s*[+=<>^\u2264\u2265\u2260]\s*|(?<=[\w)\]}])\s*[*/]\s*(?=[\w(\[{])|(?<=\d):(?=\d)"
              r"|(?<=[\w)\]}])\s+-\s+(?=[\w(\[{])|(?<=[\d)\]}])-(?=[\w(\[{])|(?<=\w)-(?=[\d(\[{])"
              r"|(?<![a-z][a-z])(?<=[a-z])-(?=[a-z](?![a-z]))|(?<![\w)\]}])-(?=[a-z(\[{\\])")
#: a comma between numbers that groups no thousands, kept (its spaces dropped): "2,3", "(1, 2)" are lists,
#: not 23 and 12
_LIST_COMMA = r"(?<=\d)\s*,\s*(?=\d)(?!\d{3}(?!\d))"
_TEXT_PARTS = re.compile(rf"(?P<kept>{_OPERATORS}|{_LIST_COMMA})|{_PUNCTUATION.pattern}")
#: the same, brackets kept too, for a text with an operator in it: "(x+1)^2" is not "x+1^2"
_MATH_PARTS = re.compile(rf"(?P<kept>{_OPERATORS}|{_LIST_COMMA}|[()\[\]])|{_PUNCTUATION.pattern}")


def normalize_text(text: str) -> str:
    """Lower case, no punctuation but a number's sign, point and fraction bar and an expression's
    operators (and brackets, where it has one), no articles, single spaces; an answer that is only an
    article (the letter "A") is kept."""
    lowered = _MINUS.sub("-", text.lower())
    parts = _MATH_PARTS if re.search(_OPERATORS, lowered) else _TEXT_PARTS
    words = parts.sub(lambda part: part["kept"].strip() if part["kept"] else "", lowered).split()
    return " ".join([word for word in words if word not in ("a", "an", "the")] or words)


class ExactMatchGrader:
    """Normalised exact match of "the answer is X" (else the last line), or of the box in it, against the reference."""

    name = "exact"

    def extract(self, text: str, item: Item | None = None) -> str | None:
        """The normalised final answer."""
        text = answer_text(text)
        clause = _answer_clause(text)
        if clause is None:
            lines = [line for line in _without_others(text).splitlines() if line.strip()]
            clause = lines[-1] if lines else ""
        return normalize_text(_unboxed(clause) or clause) or None

    def grade(self, text: str, item: Item) -> bool:
        """Equal after normalisation."""
        return self.extract(text, item) == normalize_text(answer_text(item.answer))  # (a JSON reference: read alike)


class AutoGrader:
    """Picks per item: choices means letters, a numeric reference means numbers, else exact match."""

    name = "auto"

    def __init__(self) -> None:
        self.mc, self.numeric, self.exact = MultipleChoiceGrader(), NumericGrader(), ExactMatchGrader()

    def pick(self, item: Item | None, text: str = "") -> Grader:
        """The grader for this item; with no item (voting), the one the answer's own form calls for:
        a lone option letter ("The answer is (A)", ``\\boxed{B}``) is multiple choice, a number
        (``\\boxed{-3}``) is numeric."""
        if item is None:  # by the first word of the clause (or its box), else of the last box: "(C)", "21 (3 times 7)"
            text = answer_text(text)
            clause = _answer_clause(text)
            clause = _affirmed(clause) if clause else clause  # (what "not 42, but 43" says: 43)
            stated = ((_unboxed(clause) or clause) if clause else _unboxed(text)) or ""
            if clause is None and not stated:  # a bare answer, its last line alone: "1 000", "1/2", "(B)"
                lines = text.strip().splitlines()
                last = lines[-1].strip().rstrip(".") if lines else ""
                if _BARE_LETTER.fullmatch(last):
                    return self.mc  # ("B" and "The answer is B" are one answer; "b" stays a word)
                if normalize_number(last) is not None:
                    return self.numeric  # ("1 000" and "1000", "0.5" and "1/2" are one answer)
            first = stated.split(maxsplit=1)[0] if stated.strip() else ""
            bare = first.rstrip(".,:;")
            if _LONE_LETTER.fullmatch(bare) and (bare != first.rstrip(".") or bare == stated.strip(" .")
                                                 or bare.startswith("(") or bare.endswith(")")):
                return self.mc  # "(C)", "b)", "C,", a clause that is the letter: not "J. K. Rowling"
            return self.numeric if bare and normalize_number(bare) is not None else self.exact
        if item.choices or _LONE_LETTER.fullmatch(item.answer.strip()):  # a letter answers a choice
            return self.mc
        if normalize_number(item.answer) is not None:
            return self.numeric
        return self.exact

    def extract(self, text: str, item: Item | None = None) -> str | None:
        """Extract with the grader this item (or, with none, this answer) needs."""
        return self.pick(item, text).extract(text, item)

    def grade(self, text: str, item: Item) -> bool:
        """Grade with the grader this item needs."""
        return self.pick(item).grade(text, item)


GRADERS: dict[str, Callable[[], Grader]] = {
    "auto": AutoGrader,
    "mc": MultipleChoiceGrader,
    "numeric": NumericGrader,
    "exact": ExactMatchGrader,
}


def ungradable(grader: Grader, item: Item) -> str | None:
    """Why ``grader`` could never grade ``item`` correct, or None: the letters grader on an answer
    that is no letter of its choices, the numbers grader on an answer that is no number."""
    if isinstance(grader, MultipleChoiceGrader):
        valid = LETTERS[: len(item.choices)] if item.choices else LETTERS
        reference = grader.reference(item)
        if len(reference) != 1 or reference not in valid:
            has = f"its {len(item.choices)} choices" if item.choices else "no choices"
            return f"its answer {item.answer!r} is not the letter of a choice (it has {has})"
    if isinstance(grader, NumericGrader) and normalize_number(item.answer) is None:
        return f"its answer {item.answer!r} is not a number"
    return None


def check_grader(grader: Grader, items: Iterable[Item], source: str) -> None:
    """Refuse a grader that could never grade an item of ``source`` correct (every answer would
    count as wrong): one line naming the item."""
    for item in items:
        why = ungradable(grader, item)
        if why is not None:
            raise ConfigError(f"the {grader.name} grader cannot grade item {item.id} of {source}: {why}; choose "
                              "another grader (auto picks one per item)")


def get_grader(name: str | Grader) -> Grader:
    """A grader by name (``auto``, ``mc``, ``numeric``, ``exact``) or the grader itself."""
    if not isinstance(name, str):
        return name
    try:
        return GRADERS[name]()
    except KeyError:
        raise ConfigError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}") from None


#: a lettered choice on its own line, as a data set's question shows its choices (``Item.prompt``)
_CHOICE_LINE = re.compile(r"^\(([A-J])\) (.+)$", re.MULTILINE)


def choices_of(task: str) -> Item | None:
    """The lettered choices ``task`` lists, one a line from ``(A)`` on ("(A) Paris", as a data set's
    question shows them), as an item without an answer for reading replies by with no reference (a
    vote, a confident team's agreement: "London." and "The answer is (B)" are one option); else None."""
    if "(B) " not in task:  # (most tasks: no regular expression over them)
        return None
    found = _CHOICE_LINE.findall(task)
    if len(found) < 2 or not LETTERS.startswith("".join(letter for letter, _ in found)):
        return None
    return Item.model_construct(id="task", question=task, answer="", choices=tuple(text.strip() for _, text in found),
                                category=None)  # (no answer to validate: none is known)


def answer_format(item: Item | None) -> str:
    """How an expert should state its final answer so the grader finds it."""
    if item is not None and item.choices:
        return 'End with "The answer is (X)" where X is the letter of your choice.'
    if item is not None and normalize_number(item.answer) is not None:
        return 'End with "The answer is N" where N is the final number.'
    return 'End with "The answer is ..." followed by your final answer.'
