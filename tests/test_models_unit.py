"""Request/result types, structured-output helpers, prices, test doubles and the request switch."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from pydantic import BaseModel, ValidationError

from orchestra.errors import BadResponse, ModelRequestsForbidden
from orchestra.models import (
    ChatRequest,
    ChatResult,
    FunctionModel,
    Message,
    OpenAICompatible,
    Price,
    ScriptedModel,
    Usage,
    price_for,
)
from orchestra.models.structured import StructuredOutputError, check_schema, extract_json, parse_output


class Point(BaseModel):
    x: int
    y: int


def test_request_accepts_dicts_or_messages_and_normalises_stop() -> None:
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}, Message(role="assistant", content="yo")],
                          stop="END")
    assert request.messages[0] == Message(role="user", content="hi")
    assert request.stop == ("END",)
    with pytest.raises(ValidationError):
        ChatRequest(messages="hi")
    with pytest.raises(ValidationError):
        ChatRequest(messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(ValidationError):
        ChatRequest(messages=[], output="xml")


def test_request_output_formats() -> None:
    assert not ChatRequest.user("a").wants_json
    assert ChatRequest.user("a", output="json").output_schema is None
    pydantic_request = ChatRequest.user("a", output=Point)
    assert pydantic_request.output_model is Point and pydantic_request.schema_name == "Point"
    assert pydantic_request.output_schema["required"] == ["x", "y"]


def test_request_key_changes_with_temperature_seed_and_model() -> None:
    base = ChatRequest.user("same", temperature=0.7, seed=1)
    assert base.key("m") == ChatRequest.user("same", temperature=0.7, seed=1).key("m")
    assert base.key("m") != base.key("other")
    assert base.key("m") != ChatRequest.user("same", temperature=0.2, seed=1).key("m")
    assert base.key("m") != ChatRequest.user("same", temperature=0.7, seed=2).key("m")
    assert ChatRequest.user("s", output=Point).canonical()["output"]["model"] == "Point"


@pytest.mark.parametrize("request_", [
    ChatRequest.user('quotes " and \\ back, a tab\t, a newline\n, a control \x01, ö and ☃', system="be \"brief\""),
    ChatRequest.user("a", temperature=0.7, max_tokens=5, seed=3, stop=["x", '"y', "\n"]),
    ChatRequest.user("a", temperature=float("nan")), ChatRequest.user("a", temperature=1e-30),
    ChatRequest.user("a", temperature=float("inf")), ChatRequest.user("a", seed=-2**70),
    ChatRequest.user("a", output="json"), ChatRequest.user("a", output=Point),
    ChatRequest.user("a", output={"type": "object", "b": [1, {"z": None, "c": True}], "a": {"ü": 1.5}}),
    ChatRequest(messages=[{"role": "user", "content": "1"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "2"}]),
])
def test_request_key_hashes_the_sorted_json_earlier_versions_recorded(request_: ChatRequest) -> None:
    """The key is written field by field; a run recorded before must find its calls by it."""
    expected = json.dumps({"model": 'm "ö"', **request_.canonical()}, sort_keys=True, ensure_ascii=False)
    assert request_.keyed('m "ö"') == (hashlib.sha256(expected.encode()).hexdigest(), expected)


def test_a_schema_changed_in_place_changes_the_key() -> None:
    schema: dict[str, object] = {"type": "object", "properties": {"a": {"type": "string"}}}
    before = ChatRequest.user("q", output=schema).key("m")
    assert ChatRequest.user("q", output=schema).key("m") == before
    schema["properties"] = {"a": {"type": "integer"}}
    assert ChatRequest.user("q", output=schema).key("m") != before
    assert ChatRequest.user("q", output=dict(schema, type="object")).key("m") == ChatRequest.user(
        "q", output=schema).key("m")  # an equal schema, another dict


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "object", "properties": {"k": {"type": "array", "items": {"type": ["string", "null"]}, "minItems": 1}},
      "required": ["k"], "additionalProperties": False, "$defs": {"x": {}}}, None),
    (Point.model_json_schema(), None),
    ({"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}, None),  # draft 7's tuple
    ({"properties": {"a": True, "b": False}, "items": False}, None),  # boolean subschemas
    ({"items": [{"type": "string"}, {"type": "text"}]}, "$.items[1].type must be one of"),
    ({"type": "objekt"}, "$.type must be one of object, array"),
    ({"properties": {"a": {"items": {"type": "float"}}}}, "$.properties.a.items.type must be one of"),
    ({"required": "a"}, "$.required must be a list of property names"),
    ({"type": "array", "maxItems": -1}, "$.maxItems must be a whole number"),
    ({"properties": []}, "$.properties must be an object of schemas"),
    ({"additionalProperties": "no"}, "$.additionalProperties must be true, false or a schema"),
])
def test_a_schema_check_schema_cannot_use_is_named_where(schema: dict[str, object], problem: str | None) -> None:
    from orchestra.models.structured import schema_problem
    from orchestra.settings import AnswerOptions

    found = schema_problem(schema)
    assert found == problem if problem is None else found is not None and found.startswith(problem)
    if problem is not None:
        with pytest.raises(ValidationError, match="the schema is not usable"):
            AnswerOptions(output=schema)


def test_usage_adds() -> None:
    total = Usage(prompt_tokens=1, completion_tokens=2, cost_usd=0.5) + Usage(prompt_tokens=3, cost_usd=0.25)
    assert total == Usage(prompt_tokens=4, completion_tokens=2, cost_usd=0.75)
    assert total.total_tokens == 6


def test_prices_exact_prefix_and_unknown() -> None:
    assert price_for("gpt-4o") == Price(input=2.5, output=10)
    assert price_for("gpt-4o-mini-2024-07-18") == price_for("gpt-4o-mini")
    assert price_for("llama3:8b") == Price()
    assert Price(input=1, output=2).cost(1_000_000, 500_000) == pytest.approx(2.0)


def test_extract_json_variants() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('```json\n{"a": 2}\n```') == {"a": 2}
    assert extract_json('Sure! Here it is: {"a": 3} hope it helps') == {"a": 3}
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        extract_json("no json here")


def test_check_schema_catches_common_violations() -> None:
    schema = {"type": "object", "required": ["items"], "additionalProperties": False,
              "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "integer"}}}}
    check_schema({"items": [1, 2]}, schema)
    check_schema({"items": [1.0]}, schema)  # JSON's 1.0 is an integer
    for bad, why in [({}, "missing required"), ({"items": [1, 2, 3]}, "at most"),
                     ({"items": ["x"]}, r"\$.items\[0\]: expected integer"), ({"items": [], "z": 1}, "unexpected key"),
                     ({"items": [True]}, "expected integer"), ({"items": [1.5]}, "expected integer")]:
        with pytest.raises(StructuredOutputError, match=why):
            check_schema(bad, schema)


def test_parse_output_validates_pydantic() -> None:
    assert parse_output('{"x": 1, "y": 2}', ChatRequest.user("p", output=Point)) == Point(x=1, y=2)
    with pytest.raises(StructuredOutputError, match="y"):
        parse_output('{"x": 1}', ChatRequest.user("p", output=Point))


def test_scripted_model_list_patterns_default_and_records() -> None:
    listed = ScriptedModel(["one", {"x": 1, "y": 2}], name="s")
    results = asyncio.run(listed.complete([ChatRequest.user("a"), ChatRequest.user("b", output=Point)]))
    assert results[0].text == "one" and results[1].parsed == Point(x=1, y=2)
    assert [r.prompt_text() for r in listed.requests] == ["a", "b"]
    with pytest.raises(BadResponse, match="no reply left"):
        asyncio.run(listed.complete([ChatRequest.user("c")]))

    matched = ScriptedModel({"capital": "Paris", "re:\\d+ \\+ \\d+": "4"}, default="?")
    texts = [r.text for r in asyncio.run(matched.complete(
        [ChatRequest.user("capital of France"), ChatRequest.user("2 + 2"), ChatRequest.user("other")]))]
    assert texts == ["Paris", "4", "?"]


def test_scripted_error_replies_surface_per_request() -> None:
    model = ScriptedModel(["fine", BadResponse("scripted failure")])

    async def collect() -> dict[int, object]:
        return {i: o async for i, o in model.complete_each([ChatRequest.user("1"), ChatRequest.user("2")])}

    outcomes = asyncio.run(collect())
    assert outcomes[0].text == "fine" and isinstance(outcomes[1], BadResponse)


def test_function_model_runs_a_batch_concurrently() -> None:
    active = peak = 0

    async def answer(request: ChatRequest) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return request.prompt_text()[::-1]

    model = FunctionModel(answer, prices=(1.0, 1.0))
    results = asyncio.run(model.complete([ChatRequest.user(f"abc{i}") for i in range(5)]))
    assert [r.text for r in results] == [f"{i}cba" for i in range(5)]
    assert peak == 5
    assert results[0].usage.cost_usd > 0
    assert isinstance(results[0], ChatResult)


def test_heavy_double_counts_loads_and_refuses_unloaded_generation() -> None:
    model = FunctionModel(lambda r: "x", heavy=True)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="not loaded"):
            await model.complete([ChatRequest.user("a")])
        await model.load()
        await model.complete([ChatRequest.user("a"), ChatRequest.user("b")])
        await model.unload()

    asyncio.run(scenario())
    assert (model.loads, model.unloads, model.batches) == (1, 1, [2])


def test_switch_forbids_real_requests_in_the_suite() -> None:
    model = OpenAICompatible(model="gpt-4o-mini", base_url="http://192.0.2.1/v1")
    with pytest.raises(ModelRequestsForbidden, match="allow_model_requests"):
        asyncio.run(model.complete([ChatRequest.user("hi")]))
