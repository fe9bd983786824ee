"""The model layer: provider-independent requests and results, backends, and test doubles."""

from typing import TYPE_CHECKING

from orchestra.models.anthropic import Anthropic
from orchestra.models.base import HeavyModel, Model, ModelBase, allow_model_requests, is_heavy
from orchestra.models.llamacpp import LlamaCpp
from orchestra.models.openai import OpenAICompatible
from orchestra.models.pricing import PRICES, Price, price_for
from orchestra.models.types import ChatRequest, ChatResult, Message, Usage
from orchestra.models.vllm import VLLM
from orchestra.testing.doubles import FunctionModel, ScriptedModel

if TYPE_CHECKING:  # mypy checks that the in-process engines are heavy models, as the executor expects

    def _engines_are_heavy(llama: LlamaCpp, vllm: VLLM) -> tuple[HeavyModel, HeavyModel]:
        return llama, vllm

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
