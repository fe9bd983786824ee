"""Compatibility with real OpenAI-compatible servers, read from their own logs.

llama-cpp-python's server (``python -m llama_cpp.server``) on the embedded SmolLM2 file refuses
``response_format: json_schema`` with HTTP 500 and a validation error. Orchestra must learn that
from one request per endpoint and carry on in the strongest mode the server accepts, never retry
a request that cannot succeed, and finish planning, keywords, experts and aggregation with no
failed call. The requests are counted in the server's access log, not by Orchestra.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from real_servers import LITELLM_VERSION, RealServer, litellm_binary, start_litellm_proxy, start_llama_cpp_server
from test_cli import cli

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    server = start_llama_cpp_server(tmp_path_factory.mktemp("llama-server"))
    yield server
    server.stop()


PROXY_KEY = "sk-orchestra-compat"  # the proxy's master key, given to Orchestra through COMPAT_PROXY_KEY


@pytest.fixture(scope="module")
def litellm_proxy(llama_server: RealServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    binary = litellm_binary()
    if binary is None:
        message = "the LiteLLM proxy is not installed: .ci/run installs it in .ci-litellm (see README, Testing)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    proxy = start_litellm_proxy(tmp_path_factory.mktemp("litellm"), llama_server.url, binary, key=PROXY_KEY)
    yield proxy
    proxy.stop()


def compat_pool(directory: Path, url: str, *, backend: str = "openai", api_key_env: str | None = None) -> Path:
    """A pool on the server, with the embedded pool's settings for a 135M planner."""
    path = directory / "pool.yaml"
    path.write_text(f"""
name: compat
models:
  smol:
    type: {backend}
    model: smollm2
    base_url: {url}
    api_key_env: {api_key_env or "null"}
    max_concurrency: 2
    timeout: 120
defaults: {{temperature: 0.0, max_tokens: 48}}
settings: {{k: 2, fast_path: false, plan_fallback: single, plan_repairs: 0, planner_max_tokens: 200}}
agents:
  - {{name: mathematician, model: smol, skills: [arithmetic, algebra]}}
  - {{name: historian, model: smol, skills: [history]}}
  - {{name: writer, model: smol, skills: [writing]}}
""")
    return path


def test_ask_with_planning_finishes_and_the_refusal_costs_one_request(llama_server, tmp_path: Path) -> None:
    pool = compat_pool(tmp_path, llama_server.url)
    llama_server.chat_requests()  # only this test's requests from here on
    done = cli("ask", "What is 12 times 7?", "--pool", str(pool), "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    usage = result["usage"]
    # (the small model's keywords may name none of the pool's skills: said and counted, the calls did not fail)
    assert result["status"] == "done" and usage["failed_calls"] == 0 and usage["skill_extraction_failures"] <= 1
    statuses = llama_server.chat_requests()
    assert statuses == {200: usage["requests"] - 1, 500: 1}  # the json_schema probe, never retried
    assert usage["calls"] == 1 + 5 + 2 + 1  # the plan, 5 keyword samples, 2 experts, the synthesis
    calls = json.loads(cli("show", result["run_id"], "--json").stdout)["calls"]
    assert {c["purpose"] for c in calls} >= {"plan", "keywords", "expert", "aggregate"}
    assert all(c["status"] == "ok" for c in calls)


def test_eval_finishes_every_item_with_one_refusal(llama_server, tmp_path: Path) -> None:
    pool = compat_pool(tmp_path, llama_server.url)
    data = tmp_path / "quiz.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "question": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
                            for i in range(2)))
    llama_server.chat_requests()
    done = cli("eval", "--data", str(data), "--pool", str(pool), "--k", "1", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # (the small model's keywords may name none of the pool's skills: said and counted, nothing failed)
    assert report["failed"] == 0 and report["skill_extraction_failures"] <= report["items"]
    statuses = llama_server.chat_requests()
    assert statuses == {200: report["requests"] - 1, 500: 1}


def test_what_the_readme_table_says_about_this_server(llama_server) -> None:
    """The facts in the README's compatibility table, measured."""
    import llama_cpp

    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    plain = httpx.post(llama_server.url + "/chat/completions", json=ask, timeout=120).json()
    assert plain["usage"]["prompt_tokens"] > 0 and plain["usage"]["completion_tokens"] > 0  # usage reported
    with httpx.stream("POST", llama_server.url + "/chat/completions", timeout=120,
                      json={**ask, "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(c.get("usage") for c in chunks)  # quirk: stream_options.include_usage is accepted, not honoured
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    refused = httpx.post(llama_server.url + "/chat/completions", json={**ask, "response_format": schema}, timeout=120)
    assert refused.status_code == 500 and "'response_format'" in refused.text  # quirk: a 500, not a 400
    assert llama_cpp.__version__.startswith("0.3.")  # the version in the README's table


# --- the LiteLLM proxy in front of the same server ------------------------------------------------


def test_ask_through_the_litellm_proxy_counts_agree_on_both_servers(litellm_proxy, llama_server,
                                                                    tmp_path: Path) -> None:
    pool = compat_pool(tmp_path, litellm_proxy.url, api_key_env="COMPAT_PROXY_KEY")
    litellm_proxy.chat_requests()
    llama_server.chat_requests()
    done = cli("ask", "What is 12 times 7?", "--pool", str(pool), "--json", env={"COMPAT_PROXY_KEY": PROXY_KEY},
               timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "done" and result["usage"]["failed_calls"] == 0
    assert PROXY_KEY not in done.stdout + done.stderr
    expected = {200: result["usage"]["requests"] - 1, 500: 1}  # the proxy passes llama.cpp's 500 on, once
    assert litellm_proxy.chat_requests() == expected
    assert llama_server.chat_requests() == expected  # and it retried nothing upstream


def test_the_anthropic_backend_through_the_proxys_messages_route(litellm_proxy, llama_server, tmp_path: Path) -> None:
    pool = compat_pool(tmp_path, litellm_proxy.url.removesuffix("/v1"), backend="anthropic",
                       api_key_env="COMPAT_PROXY_KEY")
    litellm_proxy.chat_requests(route="/v1/messages")
    llama_server.chat_requests()
    done = cli("ask", "What is 12 times 7?", "--pool", str(pool), "--json", env={"COMPAT_PROXY_KEY": PROXY_KEY},
               timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    usage = result["usage"]
    # (the small model's keywords may name none of the pool's skills: said and counted, the calls did not fail)
    assert result["status"] == "done" and usage["failed_calls"] == 0 and usage["skill_extraction_failures"] <= 1
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0  # usage read from the Messages answers
    # the forced tool call works through the proxy: nothing refused. The proxy answers 500 when the model's
    # tool arguments are not JSON (cut at max_tokens): a 5xx, retried; each attempt is one request upstream
    at_proxy = litellm_proxy.chat_requests(route="/v1/messages")
    assert sum(at_proxy.values()) == usage["requests"] and set(at_proxy) <= {200, 500}
    assert llama_server.chat_requests() == {200: usage["requests"]}


def test_what_the_readme_table_says_about_the_proxy(litellm_proxy) -> None:
    """The facts in the README's compatibility table, measured through the proxy."""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    with httpx.stream("POST", litellm_proxy.url + "/chat/completions", headers=headers, timeout=120,
                      json={**ask, "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0  # the proxy adds the usage chunk itself
    wrong = httpx.post(litellm_proxy.url + "/chat/completions", headers={"Authorization": "Bearer sk-wrong"},
                       json=ask, timeout=60)
    assert wrong.status_code == 400  # quirk: a wrong key is a 400 ("No connected db."), not a 401
    installed = list(litellm_binary().parent.parent.glob("lib/python*/site-packages/litellm-*.dist-info"))
    assert [d.name for d in installed] == [f"litellm-{LITELLM_VERSION}.dist-info"]  # the version in the README


def test_the_answer_streams_from_both_servers_as_it_is_written(litellm_proxy, llama_server) -> None:
    """``on_text`` over real streams: llama-cpp-python's (no usage in it: the prompt is estimated)
    and the proxy's in front of it."""
    import asyncio

    from orchestra.models import ChatRequest, OpenAICompatible, allow_model_requests

    for url, key in ((llama_server.url, None), (litellm_proxy.url, "COMPAT_PROXY_KEY")):
        seen: list[str] = []
        model = OpenAICompatible(model="smollm2", base_url=url, api_key_env=key, timeout=120)
        request = ChatRequest.user("Count from one to ten in words.", max_tokens=40, temperature=0.0,
                                   on_text=seen.append)
        os.environ["COMPAT_PROXY_KEY"] = PROXY_KEY
        try:
            with allow_model_requests():
                result = asyncio.run(model.complete_one(request))
        finally:
            del os.environ["COMPAT_PROXY_KEY"]
        assert len(seen) > 3 and seen[-1] == result.text and all(b.startswith(a) for a, b in itertools.pairwise(seen))
        assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
