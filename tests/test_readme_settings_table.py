"""The README's Settings table is what error messages point to ("every setting: the README's
Settings table"): every field of ``orchestra.Settings``, nested groups' too, is named in it."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from orchestra import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def settings_table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("| setting | meaning |")
    return text[start:text.index("\n\n", start)]


def test_every_setting_is_in_the_readmes_settings_table() -> None:
    table = settings_table()
    rows = {re.split(r"(?<!\\)\|", row)[1] for row in table.splitlines()[2:]}
    missing = []
    for name, field in Settings.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
        if nested is None:
            if not any(re.search(rf"`{name}`", row) for row in rows):
                missing.append(name)
            continue
        row = next((r for r in rows if f"`{name}: {{" in r), None)
        if row is None:
            missing.append(name)
            continue
        listed = set(re.findall(r"[a-z_]+", row.split("{", 1)[1].split("}", 1)[0]))
        missing += [f"{name}.{sub}" for sub in nested.model_fields if sub not in listed]
    assert missing == []
