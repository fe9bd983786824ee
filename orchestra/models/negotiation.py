"""What a server accepts: the optional request features it refused, found from its own errors.

Real OpenAI-compatible servers refuse parameters they do not support in different ways:
llama-cpp-python's server answers ``response_format: json_schema`` with HTTP 500 and a
validation error naming ``'response_format'``; vLLM and LiteLLM answer 400 naming it; OpenAI
sends 400 with ``error.param`` set. A *feature* is an optional top-level field of a request,
qualified by its ``type`` when it has one (``response_format:json_schema``,
``response_format:json_object``, ``tool_choice:tool``), so a server may accept one kind and
refuse another. A refusal is recognised only when the error names the field it refuses: a
request refused for another reason (a prompt too long, an unknown model) is not retried
without features it never objected to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Request fields a server may refuse, with the words its errors use for them.
OPTIONAL_FIELDS: Mapping[str, tuple[str, ...]] = {
    "response_format": ("response_format", "response format", "json_schema", "json_object", "guided_json"),
    "seed": ("seed",),
    "stop": ("stop",),
    "stop_sequences": ("stop_sequences",),
    "stream_options": ("stream_options",),
    "tool_choice": ("tool_choice", "tool choice"),
    "tools": ("tools",),
}
#: Fields whose kind a backend chooses by what the server refused (a ``response_format`` mode, a forced
#: tool call or none): a request built anew may carry another kind than the one first sent.
CHOSEN_FIELDS = frozenset({"response_format", "tools", "tool_choice"})
#: Statuses that are about something else: credentials, an unknown route or model, a timeout, a rate limit.
NOT_ABOUT_A_FIELD = frozenset({401, 403, 404, 408, 429})


def feature_of(field: str, value: Any) -> str:
    """The feature a field's value asks for: ``response_format:json_schema``,
    ``response_format:json_object+schema`` (a schema beside the type), or the field's name."""
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        return field
    return f"{field}:{kind}+schema" if kind != "json_schema" and "schema" in value else f"{field}:{kind}"


def features_of(payload: Mapping[str, Any]) -> dict[str, str]:
    """The optional features a request uses: feature -> the field that carries it."""
    return {feature_of(field, payload[field]): field for field in OPTIONAL_FIELDS if field in payload}


#: file name endings a crash's traceback shows (``stop.py`` is a file, ``response_format.type`` a path)
_SOURCE_FILES = r"(?:py|pyc|pyx|so|c|cc|cpp|cu|h|hpp|js|ts|go|rs|java)"


def refused_feature(status: int, error: Any, payload: Mapping[str, Any]) -> str | None:
    """The feature of ``payload`` that an error response refuses, if it names one.

    ``error`` is the decoded error body (OpenAI's ``{"error": {"message", "param"}}``, or text).
    A 4xx may name the field plainly; a 5xx must name it as a validation error's location does,
    quoted (``'response_format'``) or as a path into the body (``response_format.json_schema``,
    ``response_format -> type``), or in ``param``, so a crash that merely mentions a word is not
    taken for a refusal.
    """
    if status < 400 or status in NOT_ABOUT_A_FIELD:
        return None
    sent = features_of(payload)
    if not sent:
        return None
    detail = error.get("error", error) if isinstance(error, dict) else error
    param = detail.get("param") if isinstance(detail, dict) else None
    text = str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    earliest: tuple[int, str] | None = None
    for feature, field in sent.items():
        if isinstance(param, str) and (param == field or param.startswith(field + ".")):
            return feature
        for word in OPTIONAL_FIELDS[field]:
            plain = rf"(?<![\w-]){re.escape(word)}(?![\w-])"
            located = (rf"['\"`]{re.escape(word)}['\"`]|->\s*{re.escape(word)}(?![\w-])"
                       rf"|(?<![\w./\\-]){re.escape(word)}(?:\s*->|\.(?!{_SOURCE_FILES}\b)[a-z_])")
            pattern = located if status >= 500 else plain
            found = re.search(pattern, text, flags=re.IGNORECASE)
            if found and (earliest is None or found.start() < earliest[0]):
                earliest = (found.start(), feature)
    return earliest[1] if earliest else None


class Capabilities:
    """The features one server was seen to accept and to refuse (shared by every model on it)."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.refused: dict[str, str] = {}  # feature -> the server's reason, shortened

    def unknown(self, payload: Mapping[str, Any]) -> set[str]:
        """The features of ``payload`` not yet seen accepted."""
        return set(features_of(payload)) - self.accepted

    def accept(self, payload: Mapping[str, Any]) -> None:
        """Every feature of ``payload`` worked."""
        self.accepted.update(features_of(payload))

    def answered(self, payload: Mapping[str, Any]) -> None:
        """A request like ``payload`` was answered before (a run's recorded answer, its request built
        anew): its features but those of ``CHOSEN_FIELDS`` worked (which kind of those it carried is
        not known, so they are still tried)."""
        self.accepted.update(feature for feature, field in features_of(payload).items() if field not in CHOSEN_FIELDS)

    def allows(self, feature: str) -> bool:
        """Whether requests may use ``feature`` (it was not refused)."""
        return feature not in self.refused

    def strip(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` without the fields of refused features (the choice between a field's kinds,
        such as a ``response_format`` mode, is the backend's)."""
        if not self.refused:  # (every request is stripped: most servers refuse nothing)
            return payload
        for feature, field in features_of(payload).items():
            if feature in self.refused:
                del payload[field]
        return payload

    def refuse(self, feature: str, reason: str) -> None:
        """The server refused ``feature``; requests are built without it from now on."""
        self.accepted.discard(feature)
        self.refused[feature] = reason
