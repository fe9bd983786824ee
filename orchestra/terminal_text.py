"""Text made safe to show on a terminal: what a model or a client wrote is never a terminal command."""

from __future__ import annotations

import re
import unicodedata

#: control characters (the escape that starts a terminal command, NUL, DEL, C1) and the bidirectional
#: overrides that make a line read other than it is (a carriage return too: it would write over
#: the line); tab and newline are kept
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with each control character written as its escape (``\\x1b``): a task sent to
    ``serve`` or a model's answer could otherwise recolour, retitle or rewrite the terminal that
    shows it. (``--json`` keeps the text as it is.)"""
    return UNSAFE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: str) -> str:
    """``text`` on one line: its line breaks and tabs written as escapes (``\\n``), so a value kept
    whole (a data-set item's id) is neither split across rows nor mistaken for another."""
    return text.replace("\n", "\\n").replace("\t", "\\t")  # (other control characters: see ``printable``)


def counted(count: int, noun: str) -> str:
    """``1 call``, ``2 calls``: a count with its noun (an English plural in ``s``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def invisible(text: str) -> bool:
    """Whether ``text`` shows nothing: spaces, control characters and format characters (a zero-width
    space, a word joiner, a byte-order mark) only. (It stops at the first visible character.)"""
    return all(character.isspace() or unicodedata.category(character) in ("Cc", "Cf") for character in text)
