"""Prompt rendering: Jinja2, sandboxed, with undefined variables as errors."""

from __future__ import annotations

import hashlib
from functools import lru_cache, cache
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from orchestra.errors import ConfigError
from orchestra.resources import prompts_dir


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    """The one sandboxed environment every prompt is rendered in."""
    return SandboxedEnvironment(loader=FileSystemLoader(str(prompts_dir())), undefined=StrictUndefined,
                                trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                                autoescape=False)


@cache
def template(name: str) -> Template:
    """A template from ``prompts/`` by file name (``"planner.j2"``)."""
    return environment().get_template(name)


@lru_cache(maxsize=256)
def compile_string(source: str) -> Template:
    """A template from a string (a persona or a workflow step's prompt)."""
    return environment().from_string(source)


def render(name: str, **variables: Any) -> str:
    """Render the named template from ``prompts/``."""
    return template(name).render(**variables).strip()


def render_string(source: str, *, where: str = "template", **variables: Any) -> str:
    """Render a template string; errors name ``where`` (a file, an agent)."""
    try:
        return compile_string(source).render(**variables).strip()
    except TemplateError as error:
        raise ConfigError(f"cannot render {where}: {error}") from None
    except Exception as error:  # noqa: BLE001 - e.g. arithmetic on a missing value inside a template
        raise ConfigError(f"cannot render {where}: {type(error).__name__}: {error}") from None


def template_hash(name: str) -> str:
    """The sha256 of a template's source, recorded as provenance in skill profiles."""
    return hashlib.sha256((prompts_dir() / name).read_bytes()).hexdigest()
