"""Request/result types, structured-output helpers, prices, test doubles and the request switch."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from orchestra import Agent, Orchestra, Pool
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
    allow_model_requests,
    price_for,
)
from orchestra.models.structured import StructuredOutputError, check_schema, extract_json, parse_output, schema_problem


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


@pytest.mark.parametrize("limits", [{"max_tokens": 0}, {"max_tokens": -5}, {"temperature": -0.5},
                                    {"temperature": float("nan")}, {"temperature": float("inf")}])
def test_a_request_refuses_limits_no_endpoint_takes(limits: dict[str, float]) -> None:
    # (llama.cpp reads a max_tokens of 0 or less as "no limit": the tiny model then wrote to the end of its context)
    with pytest.raises(ValidationError, match=next(iter(limits))):
        ChatRequest.user("hi", **limits)  # type: ignore[arg-type]
    assert ChatRequest.user("hi", max_tokens=1, temperature=0).max_tokens == 1


@pytest.mark.parametrize("batch, named", [("hi", "not str"), (["hi"], "not a list holding str"), (None, "not NoneType"),
                                          (ChatRequest.user("hi"), "not ChatRequest")])
def test_complete_refuses_what_is_not_a_list_of_requests_in_one_line(batch: object, named: str) -> None:
    model = FunctionModel(lambda request: "answer", name="f")
    with pytest.raises(TypeError, match=f"complete\\(\\) takes a list of ChatRequest, {named}: ChatRequest.user"):
        asyncio.run(model.complete(batch))  # type: ignore[arg-type]
    assert not model.requests
    assert [r.text for r in asyncio.run(model.complete([ChatRequest.user("hi")]))] == ["answer"]


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
    # (a request refuses a temperature that is not a finite number of at least 0: built without checks)
    ChatRequest.user("a").model_copy(update={"temperature": float("nan")}), ChatRequest.user("a", temperature=1e-30),
    ChatRequest.user("a").model_copy(update={"temperature": float("inf")}), ChatRequest.user("a", seed=-2**70),
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
    ({"contains": 3}, "$.contains must be a schema (or true or false)"),
    ({"if": {"type": "objekt"}, "then": {}}, "$.if.type must be one of"),
    ({"dependentRequired": {"a": "b"}}, "$.dependentRequired.a must be a list of property names"),
    ({"dependentSchemas": {"a": {"required": 3}}}, "$.dependentSchemas.a.required must be a list"),
    ({"dependencies": {"a": 3}}, "$.dependencies.a must be a list of property names or a schema"),
    ({"propertyNames": {"maxLength": -2}}, "$.propertyNames.maxLength must be a whole number"),
    ({"minContains": 1.5}, "$.minContains must be a whole number"),
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
    # a negative or non-finite price would make a bill negative and a cost budget meaningless
    for wrong in ({"input": -1.0}, {"output": float("nan")}, {"output": float("inf")}):
        with pytest.raises(ValidationError):
            Price(**wrong)


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


def test_the_simulated_engine_counts_each_generation_as_a_request() -> None:
    """Usage.requests counts every engine generation: the benchmarks' engine counted none (calls 48, requests 30)."""
    from orchestra import Agent, Orchestra, Pool
    from orchestra.testing.engines import SimulatedEngine

    engine = SimulatedEngine("e", load_s=0, per_request=0, per_batch=0)
    planner = FunctionModel(lambda request: '{"keywords": ["general"]}', name="keywords")
    pool = Pool(agents=[Agent(name="a", model=engine), Agent(name="b", model=engine)], planner=planner)
    result = Orchestra(pool, store=False, k=2).run("What is 1 + 1?", plan=False)
    assert result.status == "done", result.error
    assert result.usage.requests == result.usage.calls == len(planner.requests) + 3  # two experts, one synthesis


def test_switch_forbids_real_requests_in_the_suite() -> None:
    model = OpenAICompatible(model="gpt-4o-mini", base_url="http://192.0.2.1/v1")
    with pytest.raises(ModelRequestsForbidden, match="allow_model_requests"):
        asyncio.run(model.complete([ChatRequest.user("hi")]))


def test_a_run_that_forgot_a_double_raises_the_switchs_error(tmp_path) -> None:
    """It came back as a failed run (its error naming the switch), so a test that checked nothing
    of the result passed; the run stops at the first forbidden request, recorded, and raises."""
    from orchestra.store import RunStore

    model = OpenAICompatible(model="gpt-4o-mini", base_url="http://192.0.2.1/v1", api_key_env=None)
    planner = FunctionModel(lambda request: {"keywords": ["general"]}, name="keywords")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model), Agent(name="b", model=planner)], planner=planner),
                    store=tmp_path / "runs.db", k=2)
    with pytest.raises(ModelRequestsForbidden, match="wrap the test in orchestra.models.allow_model_requests"):
        orc.run("What is 1 + 1?", plan=False)
    assert [r.status for r in RunStore(tmp_path / "runs.db").runs()] == ["failed"]


class Line(BaseModel):
    start: Point
    end: Point | None = None
    label: str | None = Field(default=None, max_length=5)


@pytest.mark.parametrize(("value", "why"), [
    ({"start": {"x": 1, "y": 2}}, None),
    ({"start": {"x": 1, "y": 2}, "end": None, "label": "ab"}, None),
    ({"start": {"x": 1, "y": "2"}}, r"\$.start.y: expected integer"),  # through $ref to $defs
    ({"start": {"x": 1, "y": 2}, "end": {"x": 1}}, r"\$.end: fits none of anyOf .*missing required key 'y'"),
    ({"start": {"x": 1, "y": 2}, "label": "toolong"}, "fits none of anyOf"),
])
def test_schemas_written_by_pydantic_are_checked_through_refs_and_any_of(value: object, why: str | None) -> None:
    schema = Line.model_json_schema()  # what an OpenAI client sends for response_format=Line
    assert "$defs" in schema and schema_problem(schema) is None
    if why is None:
        check_schema(value, schema)
    else:
        with pytest.raises(StructuredOutputError, match=why):
            check_schema(value, schema)


@pytest.mark.parametrize(("schema", "good", "bad", "why"), [
    ({"minimum": 1, "maximum": 3}, [1, 3, 2.5], [0, 3.5], "below the minimum|above the maximum"),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 1}, [0.5], [0, 1], "must be above|must be below"),
    ({"minimum": 0, "exclusiveMinimum": True}, [0.1], [0], "must be above 0"),  # draft 4
    ({"multipleOf": 0.1}, [0.3, 1, 0], [0.35], "not a multiple of 0.1"),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, [1, 2.5, "x"], [3, 1.5], "fits 2 of oneOf|fits 0 of oneOf"),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, ["ab"], ["abc", 1], "longer than|expected string"),
    ({"not": {"type": "null"}}, [0, ""], [None], "must not fit"),
    ({"type": "array", "uniqueItems": True}, [[1, 2], [{"a": 1}, {"a": 2}], [True, 1]],
     [[1, 1], [{"a": 1}, {"a": 1}], [1, 1.0], [{"a": [2]}, {"a": [2.0]}]], "repeats"),  # (1 and 1.0: one JSON value)
    # JSON's true is not 1 (Python's True == 1 let a boolean answer pass a numeric enum)
    ({"properties": {"s": {"enum": [0, 1]}, "t": {"const": 1}, "u": {"enum": [True, [1]]}}},
     [{"s": 1, "t": 1.0, "u": True}, {"u": [1.0]}], [{"s": True}, {"t": True}, {"u": 1}, {"u": [True]}],
     "is not one of|must be 1"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}}, [["a", 1, 2]],
     [[1], ["a", "b"]], r"\$\[0\]: expected string|\$\[1\]: expected integer"),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1, "maxProperties": 2},
     [{"a": 1}], [{}, {"a": "x"}, {"a": 1, "b": 2, "c": 3}], "at least 1 keys|expected integer|at most 2 keys"),
    ({"properties": {"a": {"type": "integer"}}, "additionalProperties": False, "patternProperties": {"^x": {}}},
     [{"a": 1, "x1": 2}], [{"a": "1"}], "expected integer"),  # key patterns are left to the endpoint
    ({"$defs": {"tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}}}}},
      "$ref": "#/$defs/tree"}, [{"kids": [{"kids": []}]}], [{"kids": [{"kids": [1]}]}], r"\$.kids\[0\].kids\[0\]: expected"),
    (False, [], [1], "no value is allowed"),
    ({"type": "object", "if": {"properties": {"a": {"const": 1}}, "required": ["a"]}, "then": {"required": ["b"]},
      "else": {"required": ["c"]}}, [{"a": 1, "b": 0}, {"a": 2, "c": 0}, {"c": 0}], [{"a": 1}, {"a": 2, "b": 0}],
     r"missing required key 'b' \(under then, as \$ fits if\)|missing required key 'c' \(under else"),
    ({"type": "array", "contains": {"type": "integer"}, "maxContains": 2}, [["x", 1], [1, 2]], [["x"], [], [1, 2, 3]],
     "0 items fit contains, at least 1 must|3 items fit contains, at most 2 may"),
    ({"contains": {"const": "a"}, "minContains": 2}, [["a", "a"]], [["a", "b"]], "1 items fit contains, at least 2"),
    ({"dependentRequired": {"card": ["billing"]}, "dependentSchemas": {"vip": {"required": ["tier"]}}},
     [{}, {"card": 1, "billing": 2}, {"vip": True, "tier": 1}], [{"card": 1}, {"vip": True}],
     "key 'card' needs key 'billing' too|missing required key 'tier'"),
    ({"dependencies": {"a": ["b"], "c": {"required": ["d"]}}}, [{"a": 1, "b": 1}, {"c": 1, "d": 1}], [{"a": 1}, {"c": 1}],
     "key 'a' needs key 'b' too|missing required key 'd'"),  # draft 7's form of both
    ({"propertyNames": {"maxLength": 2, "enum": ["ab", "c"]}}, [{"ab": 1, "c": 2}], [{"abc": 1}, {"x": 1}],
     "the key name 'abc' does not fit propertyNames|the key name 'x' does not fit"),
    ({"$defs": {"a b": {"type": "string"}, "c/d": {"type": "integer"}}, "anyOf": [{"$ref": "#/$defs/a%20b"},
      {"$ref": "#/$defs/c~1d"}]}, ["x", 3], [1.5], "fits none of anyOf"),  # a pointer is a URI fragment
])
def test_check_schema_covers_numbers_combinators_arrays_and_objects(schema: dict[str, object] | bool, good: list[object],
                                                                      bad: list[object], why: str) -> None:
    if isinstance(schema, dict):
        assert schema_problem(schema) is None
    for value in good:
        check_schema(value, schema)
    for value in bad:
        with pytest.raises(StructuredOutputError, match=why):
            check_schema(value, schema)


def test_nan_and_infinity_are_not_json() -> None:
    """Python's json reads them: {"score": NaN} passed a number schema (every comparison with NaN is
    false) and went to clients as JSON their parsers refuse."""
    from orchestra.models.structured import extract_json

    for text in ('{"score": NaN}', '{"score": -Infinity}', 'Here: {"score": Infinity}'):
        with pytest.raises(StructuredOutputError, match="is not JSON"):
            extract_json(text)
    for text in ('{"score": 1e999}', 'Here: {"score": -1e999}'):  # (read as inf, sent on as Infinity)
        with pytest.raises(StructuredOutputError, match="is too large a number"):
            extract_json(text)
    assert extract_json('{"score": 1e308}') == {"score": 1e308}


def test_a_broken_schema_given_in_python_is_a_structured_output_error_not_a_crash() -> None:
    with pytest.raises(StructuredOutputError, match=r"\$.a: the schema here is a int"):
        check_schema({"a": 1}, {"properties": {"a": 5}})
    with pytest.raises(StructuredOutputError, match="points nowhere"):
        check_schema(1, {"$ref": "#/$defs/none"})


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"anyOf": [{"$ref": "#"}]}, {"allOf": [{"$ref": "#"}]},
                                    {"not": {"$ref": "#"}}, {"oneOf": [{"$ref": "#/oneOf/0"}]}])
def test_a_reference_that_goes_round_in_a_circle_ends_with_one_line(schema: dict[str, object]) -> None:
    with pytest.raises(StructuredOutputError, match="round in a circle"):
        check_schema(1, schema)


@pytest.mark.parametrize(("schema", "problem"), [
    ({"$ref": "#/$defs/missing"}, "$.$ref must point inside the schema"),
    # refused before any call (it was found only as a model's answer was checked, then blamed on the model)
    ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}},
     "$ leads round in a circle through $ref"),
    ({"properties": {"a": {"$ref": "#/properties/a"}}}, "$.properties.a leads round in a circle"),
    ({"anyOf": [{"$ref": "#"}]}, "$ leads round in a circle"),  # (through a branch checked against the same value)
    ({"$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}]}}, "$ref": "#/$defs/A"}, "$ leads round in a circle"),
    ({"$ref": "https://example.com/s.json"}, "$.$ref must point inside the schema"),
    ({"anyOf": []}, "$.anyOf must be a non-empty list of schemas"),
    ({"oneOf": [{"type": "text"}]}, "$.oneOf[0].type must be one of"),
    ({"$defs": {"a": {"required": "x"}}}, "$.$defs.a.required must be a list"),
    ({"minimum": "1"}, "$.minimum must be a number"),
    ({"maximum": True}, "$.maximum must be a number"),
    ({"multipleOf": 0}, "$.multipleOf must be a number above 0"),
    ({"additionalProperties": {"type": "float"}}, "$.additionalProperties.type must be one of"),
    ({"not": {"minItems": -1}}, "$.not.minItems must be a whole number"),
    ({"maxProperties": 1.5}, "$.maxProperties must be a whole number"),
])
def test_schema_problem_names_bad_new_keywords(schema: dict[str, object], problem: str) -> None:
    found = schema_problem(schema)
    assert found is not None and found.startswith(problem), found


def test_an_answer_that_ends_as_its_batch_is_cancelled_reaches_the_batch() -> None:
    """With a generation as its own task (so one call can be stopped), a batch cancelled between the
    answer's end and its own next turn lost that answer: neither recorded nor counted (found by a review)."""
    from orchestra.models.base import ModelBase, generations

    class Engine(ModelBase):
        concurrent = False
        is_test_double = True
        name = "engine"
        batch: asyncio.Future[None] | None = None

        async def _generate(self, request: ChatRequest) -> ChatResult:
            assert self.batch is not None
            asyncio.get_running_loop().call_soon(self.batch.cancel)  # (runs before the batch hears of the answer)
            return ChatResult(text="answer", model=self.name, usage=Usage(requests=1))

    async def main() -> list[object]:
        engine, got = Engine(), []

        async def batch() -> None:
            token = generations.set({})
            try:
                async for _, outcome in engine.complete_each([ChatRequest.user("q"), ChatRequest.user("r")]):
                    got.append(outcome)
            finally:
                generations.reset(token)

        engine.batch = asyncio.ensure_future(batch())
        with pytest.raises(asyncio.CancelledError):
            await engine.batch
        return got

    with allow_model_requests():
        got = asyncio.run(main())
    assert [getattr(outcome, "text", outcome) for outcome in got] == ["answer"]  # (the second was never begun)


def test_parsed_json_and_streamed_text_come_in_whole_characters() -> None:
    """A JSON answer's "\\ud83d" became a lone surrogate in its parsed value: the run's record could not
    be written (the run stayed `running`); streamed text split inside a pair, or with a lone half,
    differed from the answer it became, and serve's stream ended in `answer_rewritten`."""
    from orchestra.models.openai import text_relay

    request = ChatRequest.user("Which city?", output={"type": "object"})
    assert parse_output('{"city": "Paris \\ud83d", "\\ud83d": ["\\ud83d\\ude00"]}', request) == {
        "city": "Paris \ufffd", "\ufffd": ["\U0001f600"]}
    shown: list[str] = []
    relay = text_relay(shown.append)
    for delta in ("Smile \ud83d", "\ude00 done", " and \ud83d"):
        relay(b"data: " + json.dumps({"choices": [{"delta": {"content": delta}}]}).encode() + b"\n")
    assert shown == ["Smile ", "Smile \U0001f600 done", "Smile \U0001f600 done and "]
    relay(b"data: " + json.dumps({"choices": [{"delta": {"content": "!"}}]}).encode() + b"\n")
    assert shown[-1] == "Smile \U0001f600 done and \ufffd!"


def test_models_apart_only_in_extra_body_do_not_share_cached_answers() -> None:
    """Two pools on one endpoint and model id, thinking on and off in `extra_body`, shared the cache's
    answers (and a resume's): the key knew the endpoint and model id only."""
    from orchestra.models import OpenAICompatible
    from orchestra.models.base import model_identity

    def model(extra: dict | None) -> OpenAICompatible:
        return OpenAICompatible(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, extra_body=extra)

    on, off, again = model({"thinking": True}), model({"thinking": False}), model({"thinking": True})
    assert len({model_identity(on), model_identity(off), model_identity(model(None))}) == 3
    assert model_identity(on) == model_identity(again) and model_identity(model(None)) == "openai:http://127.0.0.1:9/v1:m"
    request = ChatRequest.user("Why?")
    assert request.key(model_identity(on)) != request.key(model_identity(off))


def test_engines_apart_in_a_setting_that_changes_their_answers_do_not_share_recorded_answers(tmp_path: Path) -> None:
    """A llama.cpp agent whose answers were cut off, its ``default_max_tokens`` raised: the calls kept their
    keys, so ``profile --resume`` (and the response cache) gave the cut answers back. Defaults add nothing
    to the identity, so calls recorded before keep their keys."""
    from orchestra.models import VLLM, Anthropic, LlamaCpp
    from orchestra.models.base import model_identity

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1020))
    assert model_identity(LlamaCpp(gguf)) == "llamacpp:model.gguf:1024"
    llamas = [LlamaCpp(gguf), LlamaCpp(gguf, default_max_tokens=2048), LlamaCpp(gguf, repeat_penalty=1.0),
              LlamaCpp(gguf, n_ctx=8192)]
    assert len({model_identity(m) for m in llamas}) == 4
    assert model_identity(LlamaCpp(gguf, default_max_tokens=2048)) == "llamacpp:model.gguf:1024 default_max_tokens=2048"
    assert model_identity(VLLM("org/m")) == "vllm:org/m"
    assert len({model_identity(m) for m in (VLLM("org/m"), VLLM("org/m", default_max_tokens=4096),
                                            VLLM("org/m", max_model_len=8192),
                                            VLLM("org/m", engine_options={"quantization": "awq"}))}) == 4
    claude = Anthropic(model="c", api_key_env=None)
    assert model_identity(claude) == f"anthropic:{claude.endpoint.base_url}:c"
    assert model_identity(Anthropic(model="c", api_key_env=None, max_tokens=4096)).endswith(" max_tokens=4096")


@pytest.mark.parametrize("reply", ["", "   \n"])
def test_a_double_replying_no_text_fails_the_call_as_an_endpoint_does(reply: str) -> None:
    """A FunctionModel's empty reply made a run `done` with an empty answer, exit 0."""
    model = FunctionModel(lambda request: reply, name="fm")
    result = Orchestra(Pool(agents=[Agent(name="solo", model=model)]), k=1, plan=False, store=False).run("Why?")
    assert result.status == "failed" and "fm replied with no text ('" in (result.error or "")
    assert result.usage.failed_calls == 1 and result.usage.prompt_tokens > 0  # (what it cost, counted)


def test_a_schema_may_nest_64_levels_and_not_65() -> None:
    from orchestra.models.structured import MAX_SCHEMA_DEPTH

    def nested(levels: int) -> dict:  # the schema's object, then lists inside its enum: a level each
        value: list = []
        for _ in range(levels - 2):
            value = [value]
        return {"enum": value}

    assert MAX_SCHEMA_DEPTH == 64
    assert schema_problem(nested(64)) is None
    assert schema_problem(nested(65)) == "$ nests objects and lists more than 64 levels deep"



def test_a_model_of_ones_own_with_a_sync_generate_is_refused_as_its_class_is_made() -> None:
    """Each of its calls failed with "object ChatResult can't be used in 'await' expression", naming no model."""
    from orchestra.models.base import ModelBase

    with pytest.raises(TypeError, match=r"^SyncGen._generate must be an async def \(a coroutine function\) "
                                        "returning a ChatResult$"):
        class SyncGen(ModelBase):
            def _generate(self, request: ChatRequest) -> ChatResult:  # type: ignore[override]
                return ChatResult(text="x")


@pytest.mark.parametrize("reply, kind", [("text", "str"), (None, "NoneType")])
def test_a_model_of_ones_own_whose_generate_returns_no_chat_result_is_named(reply: object, kind: str) -> None:
    """It was "'str' object has no attribute 'usage'" (or 'NoneType' ...), naming no model."""
    from orchestra.models.base import ModelBase

    class Returns(ModelBase):
        is_test_double = True
        name = "strgen"

        async def _generate(self, request: ChatRequest) -> ChatResult:
            return reply  # type: ignore[return-value]

    with pytest.raises(TypeError) as wrong:
        asyncio.run(Returns().complete([ChatRequest.user("q")]))
    assert str(wrong.value) == f"model strgen: _generate returned {kind}, expected a ChatResult"


@pytest.mark.parametrize("usage, problem", [
    (Usage(prompt_tokens=5, completion_tokens=2**63), "completion_tokens=9223372036854775808; a token count is a whole "
                                                       "number from 0 to 1,000,000,000"),
    (Usage(prompt_tokens=-5), "prompt_tokens=-5; a token count is a whole number from 0 to 1,000,000,000"),
    (Usage(cost_usd=float("nan")), "cost_usd=nan; a cost is a finite number of dollars, 0 or more"),
    (Usage(cost_usd=-0.01), "cost_usd=-0.01; a cost is a finite number of dollars, 0 or more"),
    (Usage(requests=-1), "requests=-1; a count of requests is 0 or more")])
def test_a_model_of_ones_own_whose_usage_cannot_be_counted_is_named(usage: Usage, problem: str) -> None:
    """A NaN cost turned a cost budget off (every comparison false), a negative one lowered the run's
    cost, and 2**63 tokens failed the paid call with "Python int too large to convert to SQLite INTEGER"."""
    from orchestra.models.base import ModelBase

    class Counts(ModelBase):
        is_test_double = True
        name = "mine"

        async def _generate(self, request: ChatRequest) -> ChatResult:
            return ChatResult(text="4", usage=usage)

    with pytest.raises(BadResponse) as wrong:
        asyncio.run(Counts().complete([ChatRequest.user("q")]))
    assert str(wrong.value) == f"model mine: _generate returned usage {problem} (fix its _generate)"


@pytest.mark.parametrize("text, reason", [("", "stop"), ("  \n", None), ("", "length")])
def test_a_model_of_ones_own_that_answers_no_text_fails_its_call(text: str, reason: str | None) -> None:
    """An endpoint's and a test double's answer without text failed the call; a ``ModelBase``
    subclass's (the embedded llama.cpp engine's too) ended its run ``done`` with the answer ""."""
    from orchestra.models.base import ModelBase

    class Blank(ModelBase):
        is_test_double = True
        name = "blank"

        async def _generate(self, request: ChatRequest) -> ChatResult:
            return ChatResult(text=text, finish_reason=reason, usage=Usage(prompt_tokens=3, completion_tokens=0))

    with pytest.raises(BadResponse) as empty:
        asyncio.run(Blank().complete([ChatRequest.user("q")]))
    assert str(empty.value) == f"model blank replied with no text (finish_reason {reason or 'none'})" + (
        "; it reached max_tokens first (a reasoning model's thinking counts): raise max_tokens"
        if reason == "length" else "")
    assert empty.value.usage == Usage(prompt_tokens=3, requests=1)  # type: ignore[attr-defined]  # (paid all the same)
    planner = FunctionModel(lambda request: {"keywords": ["x"]}, name="planner")
    result = Orchestra(Pool(agents=[Agent(name="a", model=Blank())], planner=planner), k=1, aggregate="none",
                       store=False).run("What is 2+2?", plan=False)
    assert result.status == "failed" and "model blank replied with no text" in (result.error or "")


@pytest.mark.parametrize("bug, says", [(KeyError("text"), "unexpected KeyError from model gateway: 'text'"),
                                       (RuntimeError(), "unexpected RuntimeError from model gateway")])
def test_a_bug_in_a_model_of_ones_own_is_named_with_its_type_and_model(bug: Exception, says: str) -> None:
    """A ``KeyError`` inside a user's ``_generate`` ended the run with "every expert failed; first
    error: 'text'", naming neither the model nor the exception (a bare ``RuntimeError()``: nothing)."""
    from orchestra.models.base import ModelBase

    class Gateway(ModelBase):
        is_test_double = True
        name = "gateway"

        async def _generate(self, request: ChatRequest) -> ChatResult:
            raise bug

    planner = FunctionModel(lambda request: {"keywords": ["x"]}, name="planner")
    result = Orchestra(Pool(agents=[Agent(name="a", model=Gateway())], planner=planner), k=1, aggregate="none",
                       store=False).run("What is 2+2?", plan=False)
    assert (result.status, result.error) == ("failed", f"answer: every expert failed; first error: {says}")
    assert [output.error for output in result.node("answer").expert_outputs] == [says]


def test_a_bug_in_an_aggregators_model_is_named_in_its_fallback_and_failed_calls() -> None:
    """The aggregator's fallback to a vote said `aggregator z failed ('text'); ...`, and the run's
    failed calls by model `first_error="'text'"` (what eval prints), naming neither type nor model."""
    def broken(request: ChatRequest) -> str:
        return {}["text"]  # type: ignore[index]

    expert = FunctionModel(lambda request: {"keywords": ["x"]} if request.wants_json else "The answer is 4", name="e")
    pool = Pool(agents=[Agent(name="a", model=expert), Agent(name="b", model=expert),
                        Agent(name="z", model=FunctionModel(broken, name="zm"))], planner=expert, aggregator="z")
    result = Orchestra(pool, k=2, mode="topk", store=False).run("What is 2+2?", plan=False)
    says = "unexpected KeyError from model zm: 'text'"
    assert any(f"aggregator z failed ({says})" in line for line in result.node("answer").recruitment["explanation"])
    assert result.usage.failed_by_model["zm"].first_error == says


def test_a_function_model_refuses_what_is_not_a_function_when_made() -> None:
    """FunctionModel("notfn") failed each call with "'str' object is not callable"."""
    from orchestra.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^FunctionModel takes a function of a request, fn\(request\) -> reply, "
                                          "not str 'notfn'$"):
        FunctionModel("notfn")  # type: ignore[arg-type]


def readme_example(heading: str) -> str:
    """The first Python block under ``heading`` in the README."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n{heading}\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readmes_own_model_example_runs_is_bounded_in_time_and_obeys_the_switch(capsys) -> None:
    """The README showed no way to write a model of one's own; its example is run as written, then its
    call made to hang (bounded by its timeout) and the switch turned off (its requests refused)."""
    from orchestra.errors import RequestTimeout

    example: dict[str, object] = {"__name__": "readme_own_model"}
    with allow_model_requests():
        exec(compile(readme_example("#### Your own model"), "README.md", "exec"), example)
    assert capsys.readouterr().out == "The answer is 42. 1.35e-05\ndone The answer is 42.\n"

    async def hangs(*args: object) -> dict[str, object]:
        await asyncio.Event().wait()
        return {}

    example["call_my_api"] = hangs
    model = example["MyModel"]("slow", timeout=0.05)  # type: ignore[operator]
    with allow_model_requests(), pytest.raises(RequestTimeout, match=r"^slow did not answer within 0.05 s$"):
        asyncio.run(model.complete([ChatRequest.user("q")]))
    with pytest.raises(ModelRequestsForbidden):
        asyncio.run(model.complete([ChatRequest.user("q")]))
