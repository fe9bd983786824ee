"""Heavy engines as Ray actors: each in-process model loads inside an actor that holds the resources
its pool entry asks for, and the executor runs as many at once as the cluster has room for.

``RayPlacement`` is the executor's ``Placement`` (``executor: ray``). ``engine(model)`` gives the
model's ``RayEngine``: the stand-in the executor loads (an actor is created with the model's
``EngineResources`` and loads the weights in its own process), sends whole batches to (one actor
call per batch, answers back together), and unloads (the actor is killed, so its device memory is
freed). ``fits`` keeps the slots: the cluster's nodes and what the loaded engines hold on each, so
four GPUs hold four one-GPU engines at once. Remote API models never come here; they stay on the
driver, as do the pipeline, the store and the event stream.

Ray is optional (``pip install 'skill-orchestra[ray]'``). The cluster is joined when the first
engine is placed: a Ray already initialised in this process, else ``ray.init(ray_address)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orchestra.models.base as model_base
from orchestra.errors import ClusterUnreachable, EngineLost, MissingDependency, ModelError, ResourceUnavailable
from orchestra.models.base import HeavyModel, Outcome, allow_model_requests, model_identity
from orchestra.models.placement import resources_of
from orchestra.models.pricing import FREE
from orchestra.models.types import ChatRequest, ChatResult, Usage


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise MissingDependency("executor: ray needs Ray: pip install 'skill-orchestra[ray]'") from None
    return ray


class EngineActor:
    """The body of an engine's actor: one heavy model, loaded and run in the actor's process."""

    def __init__(self, model: HeavyModel) -> None:
        self.model = model

    async def load(self) -> str:
        """Load the weights; return the id of the node this actor runs on."""
        import ray

        try:
            await self.model.load()
        except Exception as error:
            raise _shippable(error) from None
        return str(ray.get_runtime_context().get_node_id())

    async def generate(self, requests: list[ChatRequest], allowed: bool) -> list[Outcome]:
        """The whole batch, as ``(index, result or error)`` pairs; ``allowed``: the driver's
        switch for real model requests (the tests' switch reaches the actor this way)."""
        with allow_model_requests(allowed):
            try:
                return [(index, _shippable(outcome)) async for index, outcome in self.model.complete_each(requests)]
            except Exception as error:
                raise _shippable(error) from None


def _shippable(outcome: Any) -> Any:
    """An error that pickle cannot rebuild (its class takes other arguments) as a ``ModelError``
    naming it, so it fails its own call, not the whole batch on the driver."""
    if not isinstance(outcome, BaseException):
        return outcome
    import pickle

    try:
        pickle.loads(pickle.dumps(outcome))
    except Exception:
        error = ModelError(f"{type(outcome).__name__}: {outcome}")
        if getattr(outcome, "usage", None) is not None:
            error.usage = outcome.usage  # type: ignore[attr-defined]
        return error
    return outcome


def _check_joined(address: str | None, context: Any) -> None:
    """Refuse a cluster address other than the one this process's Ray is joined to (a Ray already
    initialised here is used as it is: the engines ran there, the address given unheeded). Told
    apart by port (a host may be named in many ways); a Ray Client address (``ray://``), ``auto``
    and ``local`` are not compared."""
    host, colon, port = (address or "").rpartition(":")
    joined = str(getattr(context, "gcs_address", "") or "")
    if not colon or not port.isdigit() or not host or address is None or address.startswith("ray://") or not joined:
        return
    if joined.rpartition(":")[2] != port:
        raise ClusterUnreachable(f"ray_address {address} is not the Ray cluster this process is joined to ({joined}): "
                                 "leave ray_address (or --ray ADDRESS) out to use that one, or call ray.shutdown() "
                                 "first to join the other")


def _demand_text(name: str, amount: float) -> str:
    if name == "memory":
        return f"{amount / 2**30:g} GiB of memory"
    return f"{amount:g} {name}"


#: seconds to wait for a cluster's address to accept a connection before it is called unreachable
CONNECT_SECONDS = 5.0


def _check_listening(address: str) -> bool:
    """Refuse at once a ``HOST:PORT`` (or ``ray://HOST:PORT``) where nothing accepts connections:
    ``ray.init`` retries such an address for ever, deaf to Ctrl-C. (``auto`` and no address are
    Ray's to find.) Whether something was found listening there."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host:
        return False
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise ClusterUnreachable(f"cannot join the Ray cluster at {address}: nothing accepts connections there "
                                 f"({error.strerror or error}); start one with `ray start --head --port {port}`, or "
                                 "give the address it printed (--ray ADDRESS, ray_address)") from None
    return True


class RayPlacement:
    """Heavy models on a Ray cluster, one actor per loaded model (see the module's docstring).

    Args:
        address: the cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None joins the Ray
            already initialised here, else what ``ray.init()`` finds (``RAY_ADDRESS``, the last
            cluster started on this machine) or a new local instance.
    """

    def __init__(self, address: str | None = None) -> None:
        self.ray = import_ray()
        self.address = address
        self._engines: dict[int, RayEngine] = {}
        self._nodes: dict[str, dict[str, float]] | None = None
        self._actor_class: Any = None
        self._session: tuple[str, str] | None = None  # the Ray connection the engines' actors belong to

    def engine(self, model: HeavyModel) -> HeavyModel:
        """The ``RayEngine`` standing in for ``model`` (the same one every time)."""
        engine = self._engines.get(id(model))
        if engine is None or engine.model is not model:
            engine = self._engines[id(model)] = RayEngine(model, self)
        return engine

    def actor_class(self) -> Any:
        """The remote actor class (made once the cluster is joined)."""
        self.nodes()
        if self._actor_class is None:
            self._actor_class = self.ray.remote(EngineActor)
        return self._actor_class

    def nodes(self, *, refresh: bool = False) -> dict[str, dict[str, float]]:
        """Each live node's resources, by node id; joins the cluster the first time."""
        if not self.ray.is_initialized():
            listening = _check_listening(self.address or os.environ.get("RAY_ADDRESS") or "")
            try:
                self.ray.init(address=self.address, logging_level=logging.WARNING)
            except Exception as error:
                where = self.address or "RAY_ADDRESS, a running one or a new local one"
                advice = ("something listens there, yet Ray could not join it: see Ray's own lines above (a cluster "
                          "that wants an authentication token this process lacks, or another version of Ray than "
                          "this one)" if listening else "start one with `ray start --head` and set ray_address (or "
                          "--ray ADDRESS)")
                raise ClusterUnreachable(f"cannot start or join the Ray cluster ({where}): {error}; {advice}") from None
        context = self.ray.get_runtime_context()
        _check_joined(self.address, context)
        session = (context.get_job_id(), context.get_node_id())
        if session != self._session:
            if self._session is not None:  # ray.shutdown() and ray.init() since: its actors went with it
                for engine in self._engines.values():
                    engine.forget_actor()
                self._nodes = None
            self._session = session
        if self._nodes is None or refresh:
            self._nodes = {node["NodeID"]: dict(node["Resources"]) for node in self.ray.nodes() if node["Alive"]}
        return self._nodes

    def fits(self, resident: Sequence[HeavyModel], engine: HeavyModel) -> bool:
        """Whether ``engine`` can load while ``resident`` stay loaded: some node has its whole
        demand free. Raises ``ResourceUnavailable`` if no node could ever hold it."""
        assert isinstance(engine, RayEngine)
        demand = engine.demand
        nodes = self.nodes()
        if not any(_covers(total, demand) for total in nodes.values()):
            nodes = self.nodes(refresh=True)  # a node may have joined since
            if not any(_covers(total, demand) for total in nodes.values()):
                raise self._unavailable(engine, nodes)
        free = {node: dict(total) for node, total in nodes.items()}
        for other in resident:
            assert isinstance(other, RayEngine)
            node = other.node if other.node in free else next(
                (n for n, left in free.items() if _covers(left, other.demand)), None)  # still loading: first fit
            if node is not None:
                for name, amount in other.demand.items():
                    free[node][name] = free[node].get(name, 0.0) - amount
        return any(_covers(left, demand) for left in free.values())

    @staticmethod
    def _unavailable(engine: RayEngine, nodes: dict[str, dict[str, float]]) -> ResourceUnavailable:
        """The error naming the model and the first resource no node has enough of (or, when each
        is somewhere, that no node has them all)."""
        fix = "lower resources in its pool entry or add a node that has it"
        for name, amount in engine.demand.items():
            most = max((total.get(name, 0.0) for total in nodes.values()), default=0.0)
            if most < amount:
                has = "none" if not most else f"at most {_demand_text(name, most)}"
                return ResourceUnavailable(f"model {engine.name} asks the Ray cluster for "
                                           f"{_demand_text(name, amount)}, but no node has that ({has}); {fix}")
        wanted = ", ".join(_demand_text(name, amount) for name, amount in engine.demand.items())
        return ResourceUnavailable(f"model {engine.name} asks the Ray cluster for {wanted} on one node, but no "
                                   f"node has all of them; {fix}")

    def unwrap(self, error: BaseException) -> BaseException:
        """The error raised inside an actor, without Ray's wrapper."""
        if isinstance(error, self.ray.exceptions.RayTaskError) and isinstance(error.cause, Exception):
            return error.cause
        return error


def _covers(free: dict[str, float], demand: dict[str, float]) -> bool:
    return all(free.get(name, 0.0) >= amount for name, amount in demand.items())


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*")


def _cause(error: BaseException) -> str:
    """The last ``SomeError: message`` line of Ray's many-line report of an actor's death."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if _ERROR_LINE.match(line)), "its process ended")


class RayEngine:
    """A heavy model's stand-in on the driver: its weights live in a Ray actor while it is loaded.

    The executor treats it as the model itself (same name, price and cache identity); loading
    creates the actor, a batch is one actor call, unloading kills the actor.
    """

    heavy = True

    def __init__(self, model: HeavyModel, placement: RayPlacement) -> None:
        self.model = model
        self.name = model.name
        self.memory_bytes = model.memory_bytes
        self.identity = model_identity(model)
        self.price = getattr(model, "price", FREE)
        #: the engine's answer limit where a request sets none (what a budget reserves for its answers)
        self.default_max_tokens: int | None = getattr(model, "default_max_tokens", None)
        self.resources = resources_of(model)
        self.demand = self.resources.demand()
        self.node: str | None = None  # where its actor runs, once loaded
        self._placement = placement
        self._actor: Any = None

    def __repr__(self) -> str:
        return f"RayEngine({self.name!r}, {self.demand})"

    @property
    def loaded(self) -> bool:
        """Whether its actor is up (with the weights loaded)."""
        return self._actor is not None

    async def load(self) -> float:
        """Create the actor with the model's resources and load the weights in it; the seconds it took."""
        started = time.perf_counter()
        actor_class = self._placement.actor_class()
        actor = actor_class.options(max_restarts=0, **self.resources.actor_options()).remote(self.model)
        self._actor = actor
        try:
            self.node = await actor.load.remote()
        except BaseException as error:
            self._kill()
            if isinstance(error, self._placement.ray.exceptions.RayActorError):
                if not getattr(error, "actor_init_failed", True):  # its process ended while loading
                    raise EngineLost(f"the Ray actor of {self.name} died while loading it") from None
                raise ModelError(f"the Ray actor of {self.name} could not load it: {_cause(error)} (the "
                                 "model's class must be importable on every node)") from None
            raise self._placement.unwrap(error) from None
        return time.perf_counter() - started

    async def unload(self) -> None:
        """Kill the actor: its process ends and its memory (device memory too) is freed."""
        self._kill()

    def _kill(self) -> None:
        actor, self._actor, self.node = self._actor, None, None
        if actor is not None:
            try:
                self._placement.ray.kill(actor)
            except Exception:  # (an actor of an ended Ray session: gone with it)
                pass

    def forget_actor(self) -> None:
        """Its actor went with a Ray session that ended (``ray.shutdown()``): it is no longer loaded."""
        self._actor, self.node = None, None

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request in the actor, results in request order; raise the first error."""
        requests = model_base.checked_batch(requests)
        return await model_base.in_order(self.complete_each(requests), len(requests))

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """Send the whole batch to the actor; yield its ``(index, outcome)`` pairs once it answers.
        An actor that dies meanwhile is an ``EngineLost`` (and this engine is no longer loaded)."""
        if self._actor is None:
            raise RuntimeError(f"{self.name} asked to generate while not loaded")
        self._placement.nodes()  # (a Ray session ended since it loaded: its actor is gone)
        if self._actor is None:
            raise EngineLost(f"the Ray session that held the actor of {self.name} ended (ray.shutdown)")
        try:
            outcomes = await self._actor.generate.remote(list(requests), model_base.ALLOW_MODEL_REQUESTS)
        except asyncio.CancelledError:  # the actor had the whole batch: each request was sent
            listener = model_base.cancel_listener.get()
            if listener is not None:
                for request in requests:
                    listener(request, Usage(requests=1))
            raise
        except self._placement.ray.exceptions.RayActorError:
            self._kill()
            raise EngineLost(f"the Ray actor of {self.name} died while generating a batch of "
                             f"{len(requests)} call(s)") from None
        except Exception as error:
            raise self._placement.unwrap(error) from None
        for outcome in outcomes:
            yield outcome
