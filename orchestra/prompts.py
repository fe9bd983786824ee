"""Prompt rendering: Jinja2, sandboxed, with undefined variables as errors."""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from functools import cache, lru_cache
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from orchestra.errors import ConfigError
from orchestra.resources import prompts_dir

#: Limits on what one template may build or do: a workflow's templates come from files that may
#: not be the user's own, and ``{{ 9 ** (9 ** 9) }}`` or two nested ``range(100000)`` loops must
#: not hang or exhaust the machine.
MAX_TEMPLATE_SIZE = 1_000_000
"""The longest string or list an operator, a call or a filter may produce, and the largest
integer argument a call or filter may take (a width, a count)."""
MAX_TEMPLATE_NUMBER_BITS = 256
"""The largest integer (in bits) arithmetic may produce."""
MAX_TEMPLATE_ITERATIONS = 1_000_000
"""The most items ``range`` may produce over one render."""
MAX_TEMPLATE_OUTPUT = 2_000_000
"""The most characters one render may write."""
MAX_TEMPLATE_SECONDS = 5.0
"""The longest one render may take."""
MAX_TASK_CHARS = 500_000
"""The longest task a run takes (a data set's question too): the planner's prompt holds the task
twice, with its context, within ``MAX_TEMPLATE_OUTPUT``."""
MAX_CONTEXT_CHARS = 500_000
"""The longest context (a conversation, with chat's replan hint) and answer format a run takes: with
the task twice, the planner's prompt stays within ``MAX_TEMPLATE_OUTPUT``."""

_HUGE_WIDTH = re.compile(r"%[-+ #0]*\d{7,}")  # "%01000000000d" would build a gigabyte
_iterations: ContextVar[list[int] | None] = ContextVar("template_iterations", default=None)


def _checked(value: Any) -> Any:
    """``value`` if it is within the size limits; else a ``SecurityError``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > MAX_TEMPLATE_NUMBER_BITS:
        raise SecurityError(f"a number in a template went over {MAX_TEMPLATE_NUMBER_BITS} bits")
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_TEMPLATE_SIZE:
        raise SecurityError(f"a value in a template went over {MAX_TEMPLATE_SIZE:,} items")
    return value


def _check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_SIZE:
            raise SecurityError(f"a template passed {value} where at most {MAX_TEMPLATE_SIZE:,} is allowed")


def _range(*args: int) -> range:
    """``range`` that counts what it produces against the render's iteration limit."""
    _check_arguments(args, {})
    produced = range(*args)
    spent = _iterations.get()
    if spent is not None:
        spent[0] += len(produced)
        if spent[0] > MAX_TEMPLATE_ITERATIONS:
            raise SecurityError(f"a template's loops went over {MAX_TEMPLATE_ITERATIONS:,} iterations")
    return produced


def _limited_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment marks
    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args[1:], kwargs)
        return _checked(function(*args, **kwargs))
    return limited


class LimitedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with bounded arithmetic, sizes and loops (see the ``MAX_TEMPLATE_*`` limits).

    Intercepted operators are never folded at compile time, so checking a template (``orchestra
    validate``) never evaluates its expressions.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _range
        self.filters = {name: _limited_filter(f) for name, f in self.filters.items()}

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``x.name``: a dict's key before its method of that name, so an input, a step or a JSON
        field named ``items``, ``values``, ``keys`` or ``get`` is that value, not the method
        (``steps.items()`` still loops over the steps where no step is named so)."""
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Arithmetic with bounded results: a power is refused before it is computed."""
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * max(1, abs(left).bit_length() - 1) > MAX_TEMPLATE_NUMBER_BITS:
                raise SecurityError(f"a number in a template went over {MAX_TEMPLATE_NUMBER_BITS} bits")
        if operator == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):
            raise SecurityError(f"a format width in a template is over {MAX_TEMPLATE_SIZE:,}")
        if operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            count = right if isinstance(right, int) else left
            sized = left if isinstance(right, int) else right
            if isinstance(count, int) and count * len(sized) > MAX_TEMPLATE_SIZE:
                raise SecurityError(f"a value in a template went over {MAX_TEMPLATE_SIZE:,} items")
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """A call from template code, with bounded arguments and result."""
        _check_arguments(args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))


@lru_cache(maxsize=1)
def environment() -> LimitedSandbox:
    """The one sandboxed environment every prompt is rendered in."""
    return LimitedSandbox(loader=FileSystemLoader(str(prompts_dir())), undefined=StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, autoescape=False)


def limited_render(compiled: Template, variables: Mapping[str, Any]) -> str:
    """Render within the output, iteration and time limits."""
    token = _iterations.set([0])
    try:
        started = time.monotonic()
        parts: list[str] = []
        written = 0
        for part in compiled.generate(**variables):
            written += len(part)
            if written > MAX_TEMPLATE_OUTPUT:
                raise SecurityError(f"a template wrote more than {MAX_TEMPLATE_OUTPUT:,} characters")
            if time.monotonic() - started > MAX_TEMPLATE_SECONDS:
                raise SecurityError(f"a template took more than {MAX_TEMPLATE_SECONDS:g} s to render")
            parts.append(part)
        return "".join(parts)
    finally:
        _iterations.reset(token)


@cache
def template(name: str) -> Template:
    """A template from ``prompts/`` by file name (``"planner.j2"``)."""
    return environment().get_template(name)


@lru_cache(maxsize=256)
def compile_string(source: str) -> Template:
    """A template from a string (a workflow step's prompt, task or final; a persona is sent as written)."""
    return environment().from_string(source)


def render(name: str, **variables: Any) -> str:
    """Render the named template from ``prompts/``."""
    return limited_render(template(name), variables).strip()


#: the sha256 of the ``expert.j2`` that ``render_expert`` writes out in Python
EXPERT_TEMPLATE_SHA256 = "dc09b198c72fb6de17c46bf4f347f2137ad11b586c8be701d9d9b0b123b49b1c"


@cache
def _expert_template_unchanged() -> bool:
    return template_hash("expert.j2") == EXPERT_TEMPLATE_SHA256


def render_expert(*, task: str, instruction: str, inputs: Sequence[Mapping[str, str]], answer_format: str | None,
                  context: str) -> str:
    """``prompts/expert.j2`` rendered. It is rendered once per expert call, so it is written out
    here in Python (a tenth of Jinja's time; a test holds the two equal) and used while the template
    is the one it was written from; an edited ``expert.j2`` is rendered by Jinja."""
    if not _expert_template_unchanged():
        return render("expert.j2", task=task, instruction=instruction, inputs=inputs, answer_format=answer_format,
                      context=context)
    text = f"Conversation so far (context only; answer the assignment below):\n{context}\n\n" if context else ""
    if task != instruction:
        text += f"Overall task: {task}\n\n"
    if inputs:
        text += "Results of earlier steps you can use:\n" + "".join(
            [f"[{item['id']}] {item['instruction']}\n{item['output']}\n\n" for item in inputs])
    text += f"Your assignment: {instruction}\n\nThink it through step by step, then give a clear, complete answer."
    if answer_format:
        text += f" {answer_format}"
    return text.strip()


#: how a template that fails as it renders is reported (a run's error starts so: its hint depends on it)
RENDER_FAILED = "cannot render "


def render_string(source: str, *, where: str = "template", **variables: Any) -> str:
    """Render a template string; errors name ``where`` (a file, an agent)."""
    try:
        return limited_render(compile_string(source), variables).strip()
    except TemplateError as error:
        raise ConfigError(f"{RENDER_FAILED}{where}: {str(error).rstrip('.')}") from None  # (advice follows a ";")
    except Exception as error:
        raise ConfigError(f"{RENDER_FAILED}{where}: {type(error).__name__}: {error}") from None


def template_hash(name: str) -> str:
    """The sha256 of a template's source, recorded as provenance in skill profiles."""
    return hashlib.sha256((prompts_dir() / name).read_bytes()).hexdigest()
