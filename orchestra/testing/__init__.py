"""The test kit: run and test pipelines without an LLM or a network.

- model doubles: ``ScriptedModel`` (answers from a script) and ``FunctionModel`` (answers from a function);
- ``LoopbackServer``: a real OpenAI/Anthropic-shaped HTTP server on 127.0.0.1 whose answers come from
  a handler (``chat_handler``, ``Reply``, ``openai_reply``, ``anthropic_reply``, ``embeddings_reply``,
  ``error_reply``);
  ``python -m orchestra.testing`` serves one from another process;
- ``allow_model_requests``: the switch that forbids (``ORCHESTRA_ALLOW_MODEL_REQUESTS=0``) or allows
  real model requests;
- ``orchestra.testing.simulation``: simulated pools whose per-skill accuracy is known (import it
  directly; it builds on ``orchestra.agents``).
"""

from orchestra.models.base import allow_model_requests
from orchestra.testing.doubles import FunctionModel, ScriptedModel, ScriptedReply
from orchestra.testing.loopback import (
    Handler,
    LoopbackRequest,
    LoopbackServer,
    Reply,
    anthropic_reply,
    chat_handler,
    embeddings_reply,
    error_reply,
    openai_reply,
)

__all__ = [
    "FunctionModel",
    "Handler",
    "LoopbackRequest",
    "LoopbackServer",
    "Reply",
    "ScriptedModel",
    "ScriptedReply",
    "allow_model_requests",
    "anthropic_reply",
    "chat_handler",
    "embeddings_reply",
    "error_reply",
    "openai_reply",
]
