"""The model layer: provider-independent requests and results, backends, and test doubles.

Every name is imported from its module on first use (PEP 562), so the request and result types
load without asyncio's model machinery and the HTTP clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mypy checks that the in-process engines are heavy models, as the executor expects
    from orchestra.models.anthropic import Anthropic
    from orchestra.models.base import HeavyModel, Model, ModelBase, allow_model_requests, is_heavy
    from orchestra.models.llamacpp import LlamaCpp
    from orchestra.models.openai import OpenAICompatible
    from orchestra.models.pricing import PRICES, Price, price_for
    from orchestra.models.types import ChatRequest, ChatResult, Message, Usage
    from orchestra.models.vllm import VLLM
    from orchestra.testing.doubles import FunctionModel, ScriptedModel

    def _engines_are_heavy(llama: LlamaCpp, vllm: VLLM) -> tuple[HeavyModel, HeavyModel]:
        return llama, vllm

#: public name -> the module that defines it
_LAZY = {
    "ChatRequest": "orchestra.models.types", "ChatResult": "orchestra.models.types",
    "Message": "orchestra.models.types", "Usage": "orchestra.models.types",
    "PRICES": "orchestra.models.pricing", "Price": "orchestra.models.pricing", "price_for": "orchestra.models.pricing",
    "HeavyModel": "orchestra.models.base", "Model": "orchestra.models.base", "ModelBase": "orchestra.models.base",
    "allow_model_requests": "orchestra.models.base", "is_heavy": "orchestra.models.base",
    "Anthropic": "orchestra.models.anthropic", "LlamaCpp": "orchestra.models.llamacpp",
    "OpenAICompatible": "orchestra.models.openai", "VLLM": "orchestra.models.vllm",
    "FunctionModel": "orchestra.testing.doubles", "ScriptedModel": "orchestra.testing.doubles",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestra.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "PRICES",
    "VLLM",
    "Anthropic",
    "ChatRequest",
    "ChatResult",
    "FunctionModel",
    "HeavyModel",
    "LlamaCpp",
    "Message",
    "Model",
    "ModelBase",
    "OpenAICompatible",
    "Price",
    "ScriptedModel",
    "Usage",
    "allow_model_requests",
    "is_heavy",
    "price_for",
]
