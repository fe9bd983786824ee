"""Engines as Ray actors, on one local Ray instance started here (2 CPUs, 4 custom ``slot``s, no
network): groups run in parallel as far as the slots go, each model loads once, an actor killed
mid-batch is retried once on a fresh one, a model asking for what the cluster lacks (or whose class
the actors cannot import) is one clear error, the setting and the pool entries' ``resources`` flow
like every other, and the real llama.cpp engine answers from an actor.

Engines that must behave in the actor are ``FunctionModel``s whose reply functions are defined
inside the tests (so Ray ships them by value) and coordinate through files in ``tmp_path``:
parallelism is shown by a rendezvous that only overlapping batches can pass, never by durations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from orchestra import Agent, Orchestra, Pool
from orchestra.cli import main, settings_from
from orchestra.errors import ClusterUnreachable, ConfigError, MissingDependency, ResourceUnavailable
from orchestra.events import BatchFinished, BatchStarted, CallRetried, Event
from orchestra.models import ChatRequest, FunctionModel, allow_model_requests
from orchestra.models.placement import EngineResources
from orchestra.ray_engines import RayEngine, RayPlacement
from orchestra.store import RunStore
from orchestra.testing.engines import SimulatedEngine

SLOTS = 4
ONE_SLOT = EngineResources(num_cpus=0, custom={"slot": 1})
GUARD_S = 30  # how long a rendezvous waits before it gives up (only a broken scheduler makes it wait)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """One local Ray instance for the whole module."""
    ray.init(address="local", num_cpus=2, resources={"slot": SLOTS}, include_dashboard=False,
             logging_level=logging.WARNING)  # (a new instance: never a cluster running on this machine)
    yield
    ray.shutdown()


@pytest.fixture
def orchestras() -> Iterator[Callable[..., Orchestra]]:
    """Make Orchestras on the Ray executor; their actors are killed after the test, pass or fail."""
    made: list[Orchestra] = []

    def make(pool: Pool, **options: Any) -> Orchestra:
        options = {"store": False, "plan": False, "aggregate": "vote", **options}
        orc = Orchestra(pool, executor="ray", **options)
        made.append(orc)
        return orc

    yield make
    for orc in made:
        orc.close()


def keyword_model() -> FunctionModel:
    return FunctionModel(lambda request: {"keywords": ["general"]}, name="keywords")


def engine_pool(models: list[FunctionModel]) -> Pool:
    return Pool(agents=[Agent(name=f"agent-{m.name}", model=m) for m in models], planner=keyword_model())


def rendezvous_engine(name: str, folder: Path, count: int, resources: EngineResources) -> FunctionModel:
    """An engine whose batch answers only once ``count`` engines have begun a batch (or, after
    ``GUARD_S``, says it was alone)."""

    async def reply(request: ChatRequest) -> str:
        (folder / name).touch()
        for _ in range(GUARD_S * 50):
            if len(list(folder.iterdir())) >= count:
                return f"{name}: The answer is 1"
            await asyncio.sleep(0.02)
        return f"{name}: alone. The answer is 1"

    return FunctionModel(reply, name=name, heavy=True, resources=resources)


def heavy_batches(events: list[Event]) -> list[tuple[str, str]]:
    """("start" or "end", model) for every heavy batch, in the order the executor reported them."""
    return [("start" if isinstance(e, BatchStarted) else "end", e.model) for e in events
            if isinstance(e, (BatchStarted, BatchFinished)) and e.model != "keywords"]


# --- slots: parallel groups, one load each ----------------------------------------------------------


def test_four_slots_run_four_engines_at_once_each_loaded_once(tmp_path: Path, orchestras) -> None:
    models = [rendezvous_engine(f"e{i}", tmp_path, SLOTS, ONE_SLOT) for i in range(6)]
    events: list[Event] = []
    orc = orchestras(engine_pool(models), k=6, on_event=events.append)
    results = orc.run_many(["What is 1 + 1?", "What is 2 + 2?"])
    assert [r.status for r in results] == ["done", "done"], results[0].error
    assert not any("alone" in (out.text or "") for r in results for out in r.node("answer").expert_outputs)
    order = heavy_batches(events)
    assert [kind for kind, _ in order[:SLOTS]] == ["start"] * SLOTS  # four batches in flight together
    assert dict(orc.executor.stats.loads) == {m.name: 1 for m in models}
    assert set().union(*(r.model_loads for r in results)) == {m.name for m in models}
    assert not any(m.loaded for m in models)  # the driver's copies never loaded: the actors did


def test_a_model_asking_for_every_slot_runs_alone_and_evicts_the_one_before(orchestras) -> None:
    whole = EngineResources(num_cpus=0, custom={"slot": SLOTS})
    models = [FunctionModel(lambda r, i=i: f"w{i}: The answer is 1", name=f"w{i}", heavy=True, resources=whole)
              for i in range(3)]
    events: list[Event] = []
    orc = orchestras(engine_pool(models), k=3, on_event=events.append)
    result = orc.run("What is 3 + 3?")
    assert result.status == "done", result.error
    order = heavy_batches(events)
    assert [kind for kind, _ in order] == ["start", "end"] * 3  # strictly one after another
    assert dict(orc.executor.stats.loads) == {m.name: 1 for m in models}
    assert sum(orc.executor.stats.unloads.values()) == 2  # each evicted for the next; the last stays
    assert len(orc.executor.resident) == 1


def test_slots_are_counted_per_node_from_what_each_engine_holds() -> None:
    placement = RayPlacement()
    one = [RayEngine(FunctionModel(lambda r: "x", name=f"s{i}", heavy=True, resources=ONE_SLOT), placement)
           for i in range(SLOTS + 1)]
    assert placement.fits(one[:SLOTS - 1], one[SLOTS - 1])
    assert not placement.fits(one[:SLOTS], one[SLOTS])
    cpu = RayEngine(FunctionModel(lambda r: "x", name="cpu", heavy=True, resources=EngineResources(num_cpus=2)),
                    placement)
    assert placement.fits(one[:SLOTS - 1], cpu)  # slots and CPUs are different resources
    assert not placement.fits([cpu], RayEngine(FunctionModel(lambda r: "x", name="cpu2", heavy=True), placement))


# --- failures -------------------------------------------------------------------------------------------


def killed_once(name: str, folder: Path) -> FunctionModel:
    """An engine whose actor process is killed in its first batch (marked by a file in ``folder``)."""

    def reply(request: ChatRequest) -> str:
        import os
        import signal

        if not (folder / "killed").exists():
            (folder / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return f"{name}: The answer is 2"

    return FunctionModel(reply, name=name, heavy=True, resources=ONE_SLOT)


def test_an_actor_killed_mid_batch_is_retried_once_on_a_fresh_actor(tmp_path: Path, orchestras) -> None:
    fragile = killed_once("fragile", tmp_path)
    steady = FunctionModel(lambda r: "steady: The answer is 2", name="steady", heavy=True, resources=ONE_SLOT)
    events: list[Event] = []
    orc = orchestras(engine_pool([fragile, steady]), k=2, on_event=events.append)
    result = orc.run("What is 1 + 1?")
    assert result.status == "done", result.error
    assert sorted(r.text or "" for r in result.node("answer").expert_outputs) == ["fragile: The answer is 2",
                                                                          "steady: The answer is 2"]
    retried = [e for e in events if isinstance(e, CallRetried)]
    assert [e.model for e in retried] == ["fragile"] and "died while generating a batch of 1" in retried[0].reason
    assert dict(orc.executor.stats.loads) == {"fragile": 2, "steady": 1}  # the fresh actor is a load
    assert result.usage.failed_calls == 0


def crash(marker: Path, times: int) -> Callable[[], None]:
    """A load hook that kills its actor's process the first ``times`` loads (counted in ``marker``)."""

    def on_load() -> None:
        import os
        import signal

        count = int(marker.read_text()) if marker.exists() else 0
        if count < times:
            marker.write_text(str(count + 1))
            os.kill(os.getpid(), signal.SIGKILL)

    return on_load


@pytest.mark.parametrize("crashes", [1, 2])
def test_an_actor_killed_while_loading_is_loaded_once_more_then_its_calls_fail_clearly(
        tmp_path: Path, orchestras, crashes: int) -> None:
    fragile = FunctionModel(lambda r: "fragile: The answer is 2", name="fragile", heavy=True, resources=ONE_SLOT,
                            on_load=crash(tmp_path / "loads", crashes))
    steady = FunctionModel(lambda r: "steady: The answer is 2", name="steady", heavy=True, resources=ONE_SLOT)
    events: list[Event] = []
    orc = orchestras(engine_pool([fragile, steady]), k=2, on_event=events.append)
    result = orc.run("What is 1 + 1?")
    retried = [e for e in events if isinstance(e, CallRetried)]
    assert [e.model for e in retried] == ["fragile"] and "died while loading it" in retried[0].reason
    outputs = {e.model: (e.text, e.error) for e in result.node("answer").expert_outputs}
    if crashes == 1:
        assert result.status == "done" and outputs["fragile"] == ("fragile: The answer is 2", None)
        assert orc.executor.stats.loads["fragile"] == 1  # the load that finished
    else:
        assert outputs["steady"] == ("steady: The answer is 2", None)
        assert "the Ray actor of fragile died while loading it, again on a fresh start" in outputs["fragile"][1]
        assert not orc.executor.stats.loads["fragile"] and result.usage.failed_calls == 1
    assert int((tmp_path / "loads").read_text()) == crashes


def test_an_aggregators_actor_dying_again_fails_its_call_clearly_and_a_vote_answers(tmp_path: Path,
                                                                                    orchestras) -> None:
    """The aggregator's engine dies in its batch, and again on a fresh start: the call fails with
    that said, and the node takes its experts' vote (it failed the run before the fallback)."""
    def aggregator_reply(request: ChatRequest) -> str:  # killed in every aggregation batch
        import os
        import signal

        if "responses from several experts" in request.prompt_text():
            os.kill(os.getpid(), signal.SIGKILL)
        return "fragile: The answer is 2"

    fragile = FunctionModel(aggregator_reply, name="fragile", heavy=True, resources=ONE_SLOT)
    steady = FunctionModel(lambda r: "steady: The answer is 2", name="steady", heavy=True, resources=ONE_SLOT)
    pool = engine_pool([fragile, steady])
    orc = orchestras(pool, k=2, aggregate="synthesize", aggregator="agent-fragile", store=RunStore(tmp_path / "r.db"))
    result = orc.run("What is 1 + 1?")
    assert result.status == "done" and result.answer is not None and "The answer is 2" in result.answer
    [node] = result.plan.nodes
    assert node.aggregator is None and "the Ray actor of fragile died while generating a batch of 1 call(s), again " \
        "on a fresh start" in node.recruitment["explanation"][-1]  # type: ignore[index]
    assert dict(orc.executor.stats.loads) == {"fragile": 2, "steady": 1}  # resident for aggregation, then fresh
    assert result.usage.failed_calls == 1


def test_a_model_asking_for_a_resource_the_cluster_lacks_is_one_clear_error(orchestras) -> None:
    gpu = FunctionModel(lambda r: "x", name="big", heavy=True, resources=EngineResources(num_gpus=1))
    steady = FunctionModel(lambda r: "steady: The answer is 2", name="steady", heavy=True, resources=ONE_SLOT)
    orc = orchestras(engine_pool([gpu, steady]), k=2)
    result = orc.run("What is 1 + 1?")
    assert result.status == "done"  # the other expert answered
    [error] = [r.error for r in result.node("answer").expert_outputs if r.error]
    assert error == ("model big asks the Ray cluster for 1 GPU, but no node has that (none); lower resources "
                     "in its pool entry or add a node that has it")
    wide = RayEngine(FunctionModel(lambda r: "x", name="wide", heavy=True,
                                   resources=EngineResources(num_cpus=0, custom={"slot": 8})), RayPlacement())
    with pytest.raises(ResourceUnavailable, match=r"model wide asks the Ray cluster for 8 slot, but no node has "
                                                  r"that \(at most 4 slot\)"):
        wide._placement.fits([], wide)
    assert "big" not in orc.executor.stats.loads


class Unshippable(SimulatedEngine):
    """An engine class Ray's workers cannot import (this test module is not on their path)."""


def test_a_model_class_the_actors_cannot_import_is_a_clear_error(orchestras) -> None:
    engine = Unshippable("unshippable", load_s=0, per_request=0, per_batch=0, resources=ONE_SLOT)
    orc = orchestras(engine_pool([engine]), k=1)
    result = orc.run("What is 1 + 1?")
    assert result.status == "failed"
    assert ("the Ray actor of unshippable could not load it: ModuleNotFoundError: No module named 'test_ray' "
            "(the model's class must be importable on every node)") in (result.error or "")
    assert not orc.executor.stats.loads and orc.executor.resident == []


# --- the setting ------------------------------------------------------------------------------------------


def test_the_executor_setting_comes_from_the_command_line_the_pool_file_and_the_run_record(tmp_path: Path) -> None:
    ask = main.get_command(None, "ask")  # type: ignore[arg-type]
    for args, expected in ((["t"], ("local", None)), (["t", "--ray"], ("ray", None)),
                           (["t", "--ray", "auto", "--json"], ("ray", "auto")),
                           (["t", "--set", "executor=ray", "--set", "ray_address=10.0.0.1:6379"],
                            ("ray", "10.0.0.1:6379"))):
        layer = settings_from(ask.make_context("ask", args).params)
        assert (layer.executor, layer.ray_address) == expected
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text("models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\n"
                         "agents:\n  - {name: a, model: m}\nsettings: {executor: ray, ray_address: auto}\n")
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(pool_file, store=store)
    assert isinstance(orc.executor.placement, RayPlacement) and orc.executor.placement.address == "auto"
    run = asyncio.run(_record(orc))
    store.begin_run(run.run_id, run.task, run.spec.record_json())
    resumed = Orchestra.resuming(run.run_id, store=store)
    assert isinstance(resumed.executor.placement, RayPlacement) and resumed.executor.placement.address == "auto"
    assert Orchestra(pool_file, store=False, executor="local").executor.placement is None
    # a run whose cluster is gone resumes elsewhere (the error said `--ray ADDRESS`, which resume did not have)
    elsewhere = Orchestra.resuming(run.run_id, store=store, placement={"executor": "ray", "ray_address": "10.0.0.2:1"})
    assert isinstance(elsewhere.executor.placement, RayPlacement) and elsewhere.executor.placement.address == "10.0.0.2:1"
    assert Orchestra.resuming(run.run_id, store=store, placement={"executor": "local"}).executor.placement is None
    resume = main.get_command(None, "resume")  # type: ignore[arg-type]
    assert resume.make_context("resume", [run.run_id, "--ray", "10.0.0.2:1"]).params["ray"] == "10.0.0.2:1"
    assert resume.make_context("resume", [run.run_id, "--in-process"]).params["in_process"] is True


def test_a_pool_entry_says_what_its_engine_asks_the_cluster_for(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        "models:\n"
        "  small: {type: llamacpp, resources: {num_cpus: 2, memory_gb: 1.5, custom: {ssd: 1}}}\n"
        "  big: {type: vllm, model: some/model, tensor_parallel_size: 2}\n"
        "agents:\n  - {name: a, model: small}\n  - {name: b, model: big}\n")
    pool = Pool.load(pool_file)
    small, big = pool["a"].model, pool["b"].model
    assert small.resources == EngineResources(num_cpus=2, memory_gb=1.5, custom={"ssd": 1})  # type: ignore[attr-defined]
    assert small.resources.demand() == {"CPU": 2, "memory": 1.5 * 2**30, "ssd": 1}  # type: ignore[attr-defined]
    assert big.resources == EngineResources(num_gpus=2)  # type: ignore[attr-defined]  # one GPU per shard
    pool_file.write_text("models:\n  small: {type: llamacpp, resources: {custom: {GPU: 1}}}\n"
                         "agents:\n  - {name: a, model: small}\n")
    with pytest.raises(ConfigError, match=r"pool\.yaml:2:.*GPU is set by num_cpus, num_gpus or memory_gb"):
        Pool.load(pool_file)
    # amounts Ray cannot count are refused as the pool loads (Ray's error came with every call, naming no model)
    for resources, problem in (("{custom: {slot: 0.00001}}", "slot: 1e-05 is less than Ray counts (0.0001); ask for "
                                "0 or at least 0.0001"), ("{num_cpus: 0.00005}", "5e-05 is less than Ray counts"),
                               ("{num_gpus: 1.5}", "more than 1 GPU is a whole number of them")):
        pool_file.write_text(f"models:\n  small: {{type: llamacpp, resources: {resources}}}\n"
                             "agents:\n  - {name: a, model: small}\n")
        with pytest.raises(ConfigError, match=rf"pool\.yaml:2:.*resources.*{re.escape(problem)}"):
            Pool.load(pool_file)


async def _record(orc: Orchestra) -> Any:
    return orc._make_run("a task")


def test_the_ray_executor_without_ray_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray sees
    with pytest.raises(MissingDependency, match=r"pip install 'skill-orchestra\[ray\]'"):
        Orchestra(engine_pool([keyword_model()]), store=False, executor="ray")


def test_after_ray_is_shut_down_and_started_again_the_engines_load_afresh(orchestras) -> None:
    """ray.shutdown() then ray.init(), as a notebook restarts Ray: every call failed with "Can't find
    actor ... from a different cluster" and close() raised ActorHandleNotFoundError."""
    engine = FunctionModel(lambda request: "e0: The answer is 1", name="e0", heavy=True, resources=ONE_SLOT)
    events: list[Event] = []
    orc = orchestras(engine_pool([engine]), k=1, on_event=events.append)
    assert orc.run("What is 1 + 1?").status == "done"
    ray.shutdown()
    ray.init(address="local", num_cpus=2, resources={"slot": SLOTS}, include_dashboard=False,
             logging_level=logging.WARNING)  # (a new instance: never a cluster running on this machine)
    again = orc.run("What is 2 + 2?")
    assert again.status == "done" and again.usage.failed_calls == 0, again.error
    assert dict(orc.executor.stats.loads) == {"e0": 2}  # loaded again, in the new session
    assert [e.model for e in events if isinstance(e, CallRetried)] == ["e0"]
    orc.close()  # (no traceback: the old actors went with their session)


def test_an_address_where_nothing_listens_is_refused_at_once_without_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init retried such an address for ever, deaf to Ctrl-C and SIGTERM (only kill -9 ended it)."""
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # (nothing listens there now)
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        placement = RayPlacement(address)
        monkeypatch.setattr(placement, "ray", type("NotJoined", (), {
            "is_initialized": staticmethod(lambda: False),
            "init": staticmethod(lambda **options: pytest.fail("ray.init was called"))}))
        with pytest.raises(ClusterUnreachable, match=f"cannot join the Ray cluster at {re.escape(address)}: nothing "
                           f"accepts connections there .*; start one with `ray start --head --port {port}`"):
            placement.nodes()
    with socket.socket() as listening:  # a port that accepts connections, and addresses Ray finds itself, go on
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        joined: list[str | None] = []
        for address in (f"127.0.0.1:{listening.getsockname()[1]}", "auto", None):
            placement = RayPlacement(address)
            monkeypatch.setattr(placement, "ray", type("Joins", (), {
                "is_initialized": staticmethod(lambda: bool(joined) and joined[-1] == "done"),
                "init": staticmethod(lambda address, **options: joined.extend([address, "done"])),
                "get_runtime_context": staticmethod(lambda: type("Context", (), {
                    "get_job_id": staticmethod(lambda: "01"), "get_node_id": staticmethod(lambda: "n")})),
                "nodes": staticmethod(lambda: [])}))
            joined.clear()
            assert placement.nodes() == {} and joined[0] == address
        # something listens, and Ray cannot join it (a cluster that wants an auth token): not "start one"
        placement = RayPlacement(f"127.0.0.1:{listening.getsockname()[1]}")

        def refused(**options: object) -> None:
            raise ConnectionError("Failed to connect to Ray cluster")

        monkeypatch.setattr(placement, "ray", type("Refuses", (), {
            "is_initialized": staticmethod(lambda: False), "init": staticmethod(refused)}))
        with pytest.raises(ClusterUnreachable) as error:
            placement.nodes()
        assert str(error.value).endswith("Failed to connect to Ray cluster; something listens there, yet Ray could not "
                                         "join it: see Ray's own lines above (a cluster that wants an authentication "
                                         "token this process lacks, or another version of Ray than this one)")


# --- the real embedded engine in an actor ---------------------------------------------------------------------


@pytest.mark.llama
def test_the_embedded_llama_engine_answers_from_an_actor(tmp_path: Path) -> None:
    with allow_model_requests():
        orc = Orchestra("agents/pools/local.yaml", store=tmp_path / "runs.db", executor="ray", k=2)
        result = orc.run("What is 2 + 2?", plan=False)
        engine = orc.executor.placement.engine(orc.pool.agents[0].model)  # type: ignore[union-attr]
        node = engine.node
        orc.close()
    assert result.status == "done", result.error
    assert result.answer and result.answer.strip()
    assert result.model_loads == {"smollm2": 1}
    assert not orc.pool.agents[0].model.loaded  # type: ignore[attr-defined]  # generated in the actor only
    assert node in {n["NodeID"] for n in ray.nodes()} and not engine.loaded
    stored = json.loads(json.dumps(RunStore(tmp_path / "runs.db").run(result.run_id).config))
    assert stored["spec"]["settings"]["executor"] == "ray"


def test_a_ray_engine_stands_in_with_its_models_answer_limit() -> None:
    """A budget reserves an engine's answer at its own ``default_max_tokens``; the stand-in on the
    driver had none, so a Ray engine was reserved at 1,024 whatever its limit."""
    model = FunctionModel(lambda request: "x", name="engine", heavy=True)
    model.default_max_tokens = 4096  # type: ignore[attr-defined]
    assert RayEngine(model, RayPlacement.__new__(RayPlacement)).default_max_tokens == 4096
