"""Typed errors. Every message is one line a user can act on; API keys never appear in one."""

from __future__ import annotations

import os
import socket
from typing import Any


class OrchestraError(Exception):
    """Base of every error Orchestra raises on purpose."""

    exit_code: int = 1

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else self.__class__.__name__

    def __reduce__(self) -> tuple[Any, ...]:
        """Copied and pickled as made, without its constructor: the errors whose constructors take
        keywords or more than the message (``BudgetExceeded``) raised ``TypeError`` in ``copy.copy``
        and in ``pickle.loads``, as Ray unpickles an actor's error."""
        return _unpickled, (type(self), self.args), self.__dict__


def _unpickled(kind: type[OrchestraError], args: tuple[Any, ...]) -> OrchestraError:
    """An error of ``kind`` with ``args``, its constructor not called (its attributes come after)."""
    return kind.__new__(kind, *args)


class UserError(OrchestraError):
    """Something the user can fix in a file, a flag or the environment."""

    exit_code = 2


class ConfigError(UserError):
    """A bad configuration file or value; the message names the file and, where known, line:column."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        where = ""
        if path:
            where = path
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.column = path, line, column


class UnknownSetting(ConfigError, TypeError):
    """A keyword argument that names no setting: a ``ConfigError`` like every bad setting, and a
    ``TypeError`` as Python's own unexpected keyword is."""


class DatasetError(UserError):
    """A data set file that cannot be read; names the file and line."""


class ProfilingIncomplete(OrchestraError):
    """Calls of a profile failed: an unanswered question is not a wrong answer, so no profile is made.
    The exit code is that of the first failure (2 for a rejected key or an endpoint that is down)."""

    def __init__(self, message: str, cause: Exception) -> None:
        super().__init__(message)
        self.cause = cause
        self.exit_code = getattr(cause, "exit_code", 1)


class PlanError(OrchestraError):
    """A plan that stayed invalid after the repair attempts."""


class BudgetExceeded(OrchestraError):
    """A run, or a budget shared by many runs (a data set's, a server's), reached one of its limits.

    Attributes: ``limit`` (the ``Budget`` field: ``max_calls``, ``max_cost_usd`` or ``max_tokens``),
    ``value`` (its setting), ``spent`` (what was used, in words), ``run_id`` (the stopped run;
    None for a shared budget) and ``held`` (the calls in flight hold what is left: the call would
    fit once they end, so the executor waits for them instead of stopping).
    ``Orchestra.resume(run_id, budget={limit: higher})`` finishes a run.
    """

    exit_code = 3

    def __init__(self, *, limit: str, value: float, spent: str, run_id: str | None,
                 shared: str = "the data set's budget", held: bool = False, hopeless: bool = False,
                 no_room: bool = False) -> None:
        # 1000000 and 0.000001, not 1e+06 and 1e-06
        setting = f"{limit}={int(value) if float(value).is_integer() else f'{value:.10f}'.rstrip('0')}"
        alone = "is less than the next call alone may need"  # (``hopeless``: nothing was near the limit)
        if run_id is None:  # (``no_room``: what is left is too little for a run, not all spent)
            state = "has no room for another run" if no_room else alone if hopeless else "is spent"
            super().__init__(f"{shared} {setting} {state} ({spent})")
        else:
            super().__init__(f"budget {setting} {alone if hopeless else 'reached'} ({spent})")
        self.limit, self.value, self.spent, self.run_id, self.held = limit, value, spent, run_id, held
        #: the call alone is over the limit: no budget of this size could admit it
        self.hopeless = hopeless
        #: whether ``run_id`` was recorded and can be resumed (planning alone, ``Orchestra.plan``, is no run)
        self.resumable = True



class StoreError(UserError):
    """The run store cannot be opened, read or written."""


class StoreGone(StoreError):
    """The run store's file was removed (or replaced by another) while this process had it open:
    what it recorded since went with the file, so nothing can resume from it."""


class StoreUnusable(StoreError):
    """A file that cannot serve as a run store: not a database, another program's, a newer
    Orchestra's, or damaged.

    Attributes: ``path``, ``problem`` (what is wrong with it) and ``move_away`` (the advice about the
    file itself, to move it away or upgrade Orchestra; empty when the file is another program's).
    """

    def __init__(self, path: object, problem: str, *, move_away: str = "") -> None:
        self.path, self.problem, self.move_away = path, problem, move_away
        super().__init__(f"{problem}; {self.remedy('use another store file')}")

    def remedy(self, other_file: str) -> str:
        """What to do, with ``other_file`` saying how to pick another file."""
        return f"{self.move_away} or {other_file}" if self.move_away else other_file


def running_advice(pid: str, force: str) -> str:
    """What to do about a run whose process certainly still runs (``force``: how the reader says it)."""
    return (f"stop it first (kill {pid}): {force} takes over only a run whose process is gone, since both would "
            "send its calls")


class RunHeld(StoreError):
    """A stored run is still running in another live process (``owner``, active ``idle_s`` ago);
    ``running``: refused even to ``force``, that process being certainly alive on this machine;
    ``draining``: stopped there, with its requests still in flight."""

    def __init__(self, run_id: str, owner: str, idle_s: float, *, running: bool = False,
                 draining: bool = False) -> None:
        self.run_id, self.owner, self.idle_s, self.running, self.draining = run_id, owner, idle_s, running, draining
        self.pid = owner.rpartition(" pid ")[2]  # (owner: "host pid N")
        if draining:  # stopped there, its requests still in flight: a resume now would send them again
            self.problem = (f"run {run_id} was stopped in another process ({owner}, active {idle_s:.0f} s ago), whose "
                            "requests for it are still in flight")
            super().__init__(f"{self.problem}; resume it once they end (their answers are kept for the resume)")
            return
        if running:  # refused to ``force``: that process of this machine certainly still runs
            self.problem = (f"run {run_id} is running in process {self.pid} of this machine (active {idle_s:.0f} s "
                            "ago), which is still alive")
            super().__init__(f"{self.problem}; {running_advice(self.pid, 'force')}")
            return
        if owner.partition(":")[0] == f"{socket.gethostname()} pid {os.getpid()}":  # another RunStore of this process
            self.problem = (f"run {run_id} is still running in this process, in another Orchestra on the same store "
                            f"(active {idle_s:.0f} s ago)")
            super().__init__(f"{self.problem}; wait for it to end")
            return
        self.problem = f"run {run_id} is still running in another process ({owner}, active {idle_s:.0f} s ago)"
        super().__init__(f"{self.problem}; wait for it to end, or if that process is gone, resume it with force=True")


def shown_id(run_id: str) -> str:
    """A run id as a message quotes it: ``repr``, cut to 60 characters and ``...`` (one 5,000
    characters long was echoed whole)."""
    quoted = repr(run_id)
    return quoted if len(quoted) <= 63 else quoted[:60] + "..."


class RunNotFound(StoreError):
    """No stored run has the id ``run_id`` (or starts with it) in the store at ``path``; ``why``: a
    reason none can (an id that is not text SQLite can look up)."""

    def __init__(self, run_id: str, path: object, *, why: str = "") -> None:
        self.run_id, self.path = run_id, path
        self.problem = f"no run {shown_id(run_id)} in {path}" + (f": {why}" if why else "")
        super().__init__(self.problem)


# --- model layer ---------------------------------------------------------------------------


class ModelError(OrchestraError):
    """A model request that failed after the model layer's retries.

    ``usage`` is what the failed attempts still cost (a structured answer that could not be
    repaired was paid for twice), so budgets count it.
    """

    usage: Any = None


class AuthenticationError(ModelError, UserError):
    """Missing or rejected credentials. Names the environment variable, never the key."""

    exit_code = 2


class EndpointUnreachable(ModelError, UserError):
    """The endpoint could not be connected to. Names the URL."""

    exit_code = 2


class CallCancelled(ModelError):
    """A call cancelled while its request was in flight (Ctrl-C, a cancelled run): the endpoint got
    the request, so what it cost is counted and recorded."""


class ConnectionBroke(ModelError):
    """The endpoint was reached but the connection broke: reset, body cut short, protocol error."""


class RequestTimeout(ModelError):
    """The endpoint accepted the connection but did not answer in time."""


class RateLimited(ModelError):
    """The endpoint kept answering 429 after every retry."""


class RequestRejected(ModelError):
    """The endpoint refused the request (400/404/422): a bad model name, parameter or prompt."""


class FeatureRefused(RequestRejected):
    """The server refused an optional feature of the request (``response_format:json_schema``,
    ``seed``...): the request is rebuilt without it, never retried as it was."""

    def __init__(self, message: str, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class EndpointNotFound(RequestRejected, UserError):
    """The endpoint answered 404: no such API path (a ``base_url`` without its ``/v1``) or no such
    model there; every call to it would fail alike, so its run ends (exit code 2)."""

    exit_code = 2


class ContextTooLong(RequestRejected, UserError):
    """The prompt does not fit the model's context window; names the limit and the setting."""

    exit_code = 2


class BadResponse(ModelError):
    """The endpoint answered with something that is not a usable completion."""


class InvalidOutput(BadResponse):
    """The model answered, but not in the requested structure, even after a repair."""

    text: str | None = None
    """The last answer, for a repair request that shows it."""


class ModelRequestsForbidden(ModelError):
    """A real model request was made while the test switch forbids them."""


class MissingDependency(UserError):
    """An optional dependency is needed; the message names the pip extra."""


# --- engines on a cluster ------------------------------------------------------------------


class EngineLost(ModelError):
    """The process holding an engine died (a Ray actor killed or crashed) while it generated a
    batch; the batch's calls can be sent again to a fresh one."""


class ResourceUnavailable(UserError):
    """No node of the cluster has what a model asks for; names the model and the resource."""


class ClusterUnreachable(UserError):
    """The Ray cluster could not be started or connected to; names the address."""


def described(error: BaseException, model: str) -> str:
    """A call's ``error`` in one line: Orchestra's own errors by their message (it says what went
    wrong), any other (a bug in a model of one's own) by its type and ``model`` too: a ``KeyError``'s
    message alone is ``'text'``, a bare ``RuntimeError()``'s nothing."""
    if isinstance(error, OrchestraError):
        return str(error)
    return f"unexpected {type(error).__name__} from model {model}" + (f": {error}" if str(error) else "")
