"""Typed errors. Every message is one line a user can act on; API keys never appear in one."""

from __future__ import annotations

from typing import Any


class OrchestraError(Exception):
    """Base of every error Orchestra raises on purpose."""

    exit_code: int = 1

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else self.__class__.__name__


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


class DatasetError(UserError):
    """A data set file that cannot be read; names the file and line."""


class PlanError(OrchestraError):
    """A plan that stayed invalid after the repair attempts."""


class BudgetExceeded(OrchestraError):
    """A run reached one of its budget limits; the message says how to raise it."""

    exit_code = 3

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class StoreError(UserError):
    """The run store cannot be opened or read."""


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


class ConnectionBroke(ModelError):
    """The endpoint was reached but the connection broke: reset, body cut short, protocol error."""


class RequestTimeout(ModelError):
    """The endpoint accepted the connection but did not answer in time."""


class RateLimited(ModelError):
    """The endpoint kept answering 429 after every retry."""


class RequestRejected(ModelError):
    """The endpoint refused the request (400/404/422): a bad model name, parameter or prompt."""


class ContextTooLong(RequestRejected, UserError):
    """The prompt does not fit the model's context window; names the limit and the setting."""

    exit_code = 2


class BadResponse(ModelError):
    """The endpoint answered with something that is not a usable completion."""


class InvalidOutput(BadResponse):
    """The model answered, but not in the requested structure, even after a repair."""


class ModelRequestsForbidden(ModelError):
    """A real model request was made while the test switch forbids them."""


class MissingDependency(UserError):
    """An optional dependency is needed; the message names the pip extra."""
