"""The ``orchestra`` command line."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar, get_args, get_origin

import click

from orchestra import __version__
from orchestra.errors import ConfigError, OrchestraError, RunHeld, UserError
from orchestra.hints import BUDGET_FLAGS, advise_store, command
from orchestra.money import dollars, usd_alike, usd_exact
from orchestra.vocabulary import GRADER_NAMES, METHOD_NAMES

if TYPE_CHECKING:  # the rest is imported where it is used, so `--help` and `runs` start fast
    from pydantic.fields import FieldInfo

    from orchestra.agents import Pool
    from orchestra.budget import Budget
    from orchestra.core import Orchestra
    from orchestra.datasets import Dataset
    from orchestra.evaluate import EvalReport
    from orchestra.frontier import SweepPoint
    from orchestra.models import Usage
    from orchestra.profile import SkillProfile
    from orchestra.result import RunResult
    from orchestra.settings import Settings
    from orchestra.store import RunRecord, RunStore
    from orchestra.workflow import Workflow

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit."""
    from orchestra.terminal_text import printable

    click.echo(f"error: {printable(message)}", err=True)  # (it may quote an endpoint's error, or a task)
    sys.exit(code)


#: where a ``--json`` command's one JSON object goes once ``keep_stdout_for_json`` has run
_json_out: Any = None


def keep_stdout_for_json(as_json: bool) -> None:
    """With ``--json``, keep stdout for the JSON object alone: whatever else the process writes there
    (Ray prints a worker's death on stdout, C libraries write to file 1) goes to stderr, and
    ``echo_json`` writes to the stdout the command started with. (`ask --json` on Ray began with
    `(raylet) A worker died...`, which no JSON reader takes.)"""
    global _json_out
    if not as_json or _json_out is not None or sys.stdout is None:  # (None: started with stdout closed)
        return
    try:
        sys.stdout.flush()
        kept = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # (no file 1 or 2 to hand over: the JSON goes where stdout goes)
        return
    _json_out = os.fdopen(kept, "w", encoding="utf-8", closefd=True)


def echo_json(text: str) -> None:
    """Write a ``--json`` command's JSON object (see ``keep_stdout_for_json``)."""
    click.echo(text, file=_json_out)
    if _json_out is not None:
        _json_out.flush()


def stand_in_for_closed_streams() -> None:
    """A standard stream the process was started without (``>&-``, ``<&-``, a daemon's) is
    ``/dev/null``, as if redirected there: what goes out is dropped, input is empty. (Python leaves
    it ``None``: `ask`, `chat` and `serve` ended in an AttributeError traceback.)"""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))  # noqa: SIM115 (kept for the process)


def shield_ray_shutdown() -> None:
    """Once a command is done, where it used Ray: Ctrl-C is ignored while the process exits, so Ray's
    own shutdown (at exit) stops the instance it started (a press there was a traceback, exit 0, and
    Ray's processes left running)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


#: whether this process is the `orchestra` command itself (``command_line``), which exits once its command ends
_OWN_PROCESS = False


def command_line(args: Sequence[str] | None = None) -> None:
    """The `orchestra` command as its own process (the console script, ``python -m orchestra``): once
    a command has its outcome, Ctrl-C is ignored while the process prints it and exits."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    main(args)


def ignore_ctrl_c() -> None:
    """In the command's own process (``command_line``), Ctrl-C is ignored from here on, while it finishes what
    it decided and exits; a caller in its own process (click's ``CliRunner``, ``main(...)``) keeps its
    handler (it was left deaf to Ctrl-C)."""
    if _OWN_PROCESS:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


class SettingsCommand(click.Command):
    """A command whose setting options (``setting_option``) are built from the settings model the
    first time its parameters are needed (to parse its arguments or print its help), so starting
    another command, or listing them all, never loads the model."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        """The command's parameters, the deferred setting options built in their place."""
        params: list[Any] = self.params
        if any(isinstance(p, _SettingOption) for p in params):
            self.params = [p.build() if isinstance(p, _SettingOption) else p for p in params]
        return super().get_params(ctx)


#: the usage error click raises to show a group's help when no command is given (click 8.2 on; before,
#: click showed the help and exited itself)
_HELP_INSTEAD: tuple[type[click.UsageError], ...] = tuple(
    kind for kind in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if kind is not None)


class OrchestraGroup(click.Group):
    """Turns Orchestra's errors into one line on stderr and an exit code; no tracebacks."""

    command_class = SettingsCommand

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        """As click's, but a usage error (an unknown flag, a bad value, a missing option) is one line
        naming where help is, as every error here, not click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        stand_in_for_closed_streams()
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _HELP_INSTEAD as error:  # no command given: the help, as click shows it
            error.show()
            sys.exit(error.exit_code)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "orchestra"
            fail(f"{' '.join(error.format_message().split())} (see {where} --help)", error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            fail("aborted", 1)
        finally:
            shield_ray_shutdown()
        sys.exit(code if isinstance(code, int) else 0)  # (click returns what ends a command early: its exit code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrchestraError as error:
            from orchestra.hints import cli_message

            fail(cli_message(error), error.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)  # (commands that keep work say what they kept and how to go on)


@click.group(cls=OrchestraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orchestra")
def main() -> None:
    """Answer tasks with a team of LLM experts recruited by measured skills."""
    warnings.formatwarning = _one_line


def _one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    """A warning as the command line shows it: one line, no source excerpt."""
    return f"warning: {' '.join(str(message).split())}\n"


# --- shared options ------------------------------------------------------------------------


def output_options(fn: F) -> F:
    """--json, --quiet, --verbose (--quiet and --verbose together are refused)."""
    fn = click.option("--verbose", "-v", is_flag=True, callback=_not_both,
                      help="Show every prompt and response.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, callback=_not_both, help="Print only the answer.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object and nothing else.")(fn)


def _not_both(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Refuse --quiet with --verbose (whichever is read second sees the first)."""
    if value and ctx.params.get("verbose" if param.name == "quiet" else "quiet"):
        raise click.UsageError("--quiet and --verbose contradict each other; give one")
    return value


#: where the run store is when no --store is given
STORE_DEFAULT = "$ORCHESTRA_HOME/runs.db, else ~/.orchestra/runs.db"


class StoreFile(click.Path):
    """A --store: a file's path (``runs/``, written as a folder, made a file named as the folder)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value} names a folder; give the store's file, e.g. {value.rstrip('/' + os.sep)}/runs.db",
                      param, ctx)
        return super().convert(value, param, ctx)


def store_option(fn: F) -> F:
    """--store."""
    return click.option("--store", "store_path", type=StoreFile(),
                        help=f"The run store file (default {STORE_DEFAULT}).")(fn)


def store_options(fn: F) -> F:
    """--store, --no-store."""
    fn = click.option("--no-store", is_flag=True, help="Keep no record of the run (no resume).")(fn)
    return store_option(fn)


#: click destination -> the setting it sets (a dotted path into ``Settings``)
SETTING_FLAGS: dict[str, tuple[str, ...]] = {}


def _click_type(field: FieldInfo) -> Any:
    """The click type of a setting: its choices, or its number type with the model's bounds."""
    annotation = field.annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return click.Choice(list(args))
    kind = args[0] if len(args) == 1 else annotation
    if get_origin(kind) is Annotated:  # a number type that refuses true/false (orchestra.numbers)
        kind = get_args(kind)[0]
    bounds = {type(m).__name__: m for m in field.metadata}
    if kind is int:
        if "Ge" not in bounds and "Le" not in bounds:
            return int
        return click.IntRange(min=getattr(bounds.get("Ge"), "ge", None), max=getattr(bounds.get("Le"), "le", None))
    if kind is float:
        if "Gt" in bounds:
            return click.FloatRange(min=bounds["Gt"].gt, min_open=True)
        return click.FloatRange(min=getattr(bounds.get("Ge"), "ge", None))
    return kind


class FiniteRange(click.FloatRange):
    """A ``click.FloatRange`` that refuses nan and inf (click's takes nan: no comparison with it is true)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _SettingOption:
    """A ``setting_option`` not built yet: ``SettingsCommand`` builds it when the command needs it."""

    def __init__(self, path: str, flag: str, dest: str, help: str | None) -> None:
        self.path, self.flag, self.dest, self.help = path, flag, dest, help

    def build(self) -> click.Option:
        """The option, its type, choices, bounds and help read from the settings model."""
        from orchestra.settings import Settings

        *parents, leaf = self.path.split(".")
        model: Any = Settings
        for part in parents:
            model = model.model_fields[part].annotation
        field = model.model_fields[leaf]
        kind = _click_type(field)
        if kind is bool:
            return click.Option([self.flag, self.dest], is_flag=True, default=None, help=self.help or field.description)
        return click.Option([self.flag, self.dest], type=kind, help=self.help or field.description)


def setting_option(path: str, flag: str | None = None, *, help: str | None = None) -> Callable[[F], F]:
    """A command-line option that sets ``path`` (``k``, ``recruit.competence_weight``...), its type,
    choices, bounds and help taken from the settings model (when the command is run or its help
    shown; the command must be a ``SettingsCommand``, as every ``main`` command is)."""
    leaf = path.rsplit(".", 1)[-1]
    flag = flag or "--" + leaf.replace("_", "-")
    dest = flag.lstrip("-").replace("-", "_")
    SETTING_FLAGS[dest] = tuple(path.split("."))

    def decorate(fn: F) -> F:
        fn.__dict__.setdefault("__click_params__", []).append(_SettingOption(path, flag, dest, help))
        return fn

    return decorate


def _budget_flags(whose: str, *, bounded: bool = True) -> Callable[[F], F]:
    """--max-calls, --max-cost, --max-tokens: the budget of ``whose`` runs, their defaults said (none
    where ``bounded`` is false: what the flags leave out is not limited)."""
    def default(limit: str) -> str:
        return f"default {limit}" if bounded else "default: no limit"

    def decorate(fn: F) -> F:
        fn = setting_option("budget.max_tokens", "--max-tokens",
                            help=f"Token budget for {whose} ({default('1,000,000')}).")(fn)
        fn = setting_option("budget.max_cost_usd", "--max-cost", help=f"USD budget for {whose} ({default('$1')}).")(fn)
        return setting_option("budget.max_calls", "--max-calls",
                              help=f"Call budget for {whose} ({default('500')}).")(fn)
    return decorate


budget_options = _budget_flags("the run (of a data set, eval's or a workflow's: for all its items)")
#: a server's: each request's run has its own budget, beside the server's --total-max-* ones
request_budget_options = _budget_flags("each request's run")
#: a profile's: the whole command's, unlimited unless given (its help said "the run ... (default 500)")
profile_budget_options = _budget_flags("the whole profile", bounded=False)


def settings_options(fn: F) -> F:
    """--set KEY=VALUE (any setting), --memory-budget-gb and --ray [ADDRESS]."""
    fn = click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                      help="Run in-process models as Ray actors (executor: ray) on the cluster at ADDRESS "
                           "(auto, HOST:PORT; default: RAY_ADDRESS, a running one or a new local one).")(fn)
    fn = setting_option("memory_budget_gb")(fn)
    return click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                        help="Any setting, e.g. keywords.samples=3 or matcher.type=embedding (repeatable).")(fn)


def choice_options(fn: F) -> F:
    """--k, --mode, --aggregate, --aggregator-choice, --grader, --seed, --competence-weight,
    --cost-lambda, --max-cost-per-item."""
    fn = setting_option("seed")(fn)
    fn = setting_option("recruit.max_cost_per_item", "--max-cost-per-item",
                        help="calibrated: the most (USD) a node's team may be expected to cost.")(fn)
    fn = setting_option("recruit.cost_lambda", "--cost-lambda",
                        help="calibrated: the accuracy one call to the priciest model must buy (default 0.05); "
                             "other modes but random: weights times exp(-λ·price/max price).")(fn)
    fn = setting_option("recruit.competence_weight", "--competence-weight",
                        help="β in w = s·γ^β (1: Symbolic-MoE; 0: skills only).")(fn)
    fn = setting_option("grader")(fn)
    fn = setting_option("aggregator_choice")(fn)
    fn = setting_option("aggregate")(fn)
    fn = setting_option("mode")(fn)
    return setting_option("k")(fn)


def run_options(fn: F) -> F:
    """Recruiting, aggregation, caching and tracing flags."""
    fn = settings_options(fn)
    fn = click.option("--otel", is_flag=True, help="Emit OpenTelemetry spans (OTLP if configured, else stderr).")(fn)
    fn = setting_option("cache")(fn)
    return choice_options(fn)


def settings_from(opts: dict[str, Any]) -> Settings:
    """The command line's settings layer: the flags given, then ``--set`` assignments (one setting
    given both ways is refused: which should win?)."""
    from orchestra.settings import Settings, assignments

    assigned = assignments(list(opts.get("assignments", ())))
    data: dict[str, Any] = {}
    for dest, path in SETTING_FLAGS.items():
        value = opts.get(dest)
        if value is None:
            continue
        if _assigns(assigned, path):
            raise ConfigError(f"--{dest.replace('_', '-')} and --set {'.'.join(path)} both set {'.'.join(path)}; "
                              "give it once")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if opts.get("ray") is not None:  # --ray [ADDRESS]: two settings in one flag
        given = [name for name in ("executor", "ray_address") if _assigns(assigned, (name,))]
        if given:
            raise ConfigError(f"--ray and --set {given[0]} both set {given[0]}; give it once")
        data["executor"] = "ray"
        if opts["ray"]:
            data["ray_address"] = opts["ray"]
    return Settings.layer(data, where="command line").assigned(list(opts.get("assignments", ())))


def _assigns(assigned: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Whether ``--set`` assignments set the setting at ``path`` (or all of a setting above it)."""
    node: Any = assigned
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return True


def store_from(store_path: Path | None, no_store: bool) -> RunStore | bool:
    """The run store the flags ask for."""
    from orchestra.store import RunStore

    if no_store:
        if store_path is not None:  # (the record asked for would silently not be kept)
            raise click.UsageError("--store and --no-store contradict each other; give one")
        advise_store(None)
        return False
    advise_store(store_path)
    if store_path is None:
        return True
    refuse_missing_folder(store_path)
    return RunStore(store_path)


def refuse_missing_folder(store_path: Path) -> None:
    """Refuse a ``--store`` file whose folder does not exist: a mistyped path made its folders
    (only the default store's folder is made). A file in the way is ``RunStore``'s to name."""
    from orchestra.errors import StoreError

    folder = store_path.absolute().parent
    if not folder.exists() and next(p for p in folder.parents if p.exists()).is_dir():
        raise StoreError(f"the folder {folder} does not exist; create it or choose another --store")


def existing_store(store_path: Path | None) -> RunStore:
    """The store a command reads: a ``--store`` file that does not exist is refused (a typo would
    make a new, empty store and show nothing); the default one is made if need be."""
    from orchestra.store import RunStore

    refuse_missing_store(store_path)
    advise_store(store_path)
    return RunStore(store_path)


def refuse_missing_store(store_path: Path | None) -> None:
    """Refuse a ``--store`` file that does not exist, or is empty (opening it would make it a store),
    for a command that reads what was recorded."""
    from orchestra.errors import StoreError

    if store_path is not None and not store_path.exists():
        raise StoreError(f"no run store at {store_path}: nothing was recorded there; check the path given to --store")
    if store_path is not None and store_path.is_file() and store_path.stat().st_size == 0:
        raise StoreError(f"{store_path} is not a run store (an empty file): nothing was recorded there; check the "
                         "path given to --store")


def orchestra_options(opts: dict[str, Any]) -> dict[str, Any]:
    """``Orchestra`` arguments other than settings from the shared flags: the store and tracing."""
    options: dict[str, Any] = {"store": store_from(opts.get("store_path"), opts.get("no_store", False))}
    if opts.get("cache") and options["store"] is False:
        raise ConfigError("--cache needs the run store; drop --no-store")
    if opts.get("otel"):
        from orchestra.tracing import configure_exporter

        configure_exporter()
        options["tracing"] = True
    return options


def read_stdin_task(given: str = "TASK `-`") -> str:
    """The task given as `-` (or what ``given`` names): standard input as UTF-8 text (a terminal is
    not waited on), without a byte-order mark an editor put first or the newlines that end it (as a
    shell's ``$(cat file)`` reads it)."""
    if sys.stdin is None or sys.stdin.isatty():
        example = "orchestra ask - < task.txt" if given == "TASK `-`" else f"... {given} < text.txt"
        raise click.UsageError(f"{given} reads standard input; pipe it in (`{example}`)")
    try:
        return sys.stdin.buffer.read().decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise ConfigError(f"standard input is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}); send it as UTF-8") from None


def read_input_files(pairs: Sequence[str]) -> list[str]:
    """``--input-file KEY=PATH`` flags as ``KEY=VALUE`` pairs: each file's UTF-8 text (standard input
    for ``-``, once), without a byte-order mark or the newlines that end it, as ``read_stdin_task``."""
    read: list[str] = []
    for pair in pairs:
        key, sep, path = pair.partition("=")
        if not sep or not key.strip() or not path:
            raise ConfigError(f"--input-file expects KEY=PATH, got {pair!r}")
        if path == "-":
            if sum(other.partition("=")[2] == "-" for other in pairs) > 1:
                raise ConfigError("--input-file KEY=- reads standard input, which one input can take; give the "
                                  "others files")
            read.append(f"{key}={read_stdin_task(f'--input-file {key.strip()}=-')}")
            continue
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ConfigError(f"--input-file {key.strip()}: {path} is not UTF-8 text (byte "
                              f"0x{error.object[error.start]:02x} at offset {error.start})") from None
        except OSError as error:
            raise ConfigError(f"--input-file {key.strip()}: cannot read {path} ({error.strerror or error})") from None
        read.append(f"{key}={text.rstrip(chr(13) + chr(10))}")
    return read


def make_orchestra(pool: Pool, opts: dict[str, Any]) -> Orchestra:
    """An ``Orchestra`` from the shared flags; a missing API key stops here, before anything runs."""
    from orchestra.core import Orchestra

    ready(pool)
    return Orchestra(pool, settings_from(opts), **orchestra_options(opts))


def refuse_unused_recruiting(opts: dict[str, Any], mode: str, *, switch: str = "--mode",
                             pool: Pool | None = None) -> None:
    """Refuse a recruiting flag ``mode`` would accept and then not use: the cost cap per item is
    the calibrated router's, random recruiting weighs no prices, and β weighs the draw and ranks of
    symbolic-moe, topk and adaptive (calibrated recruiting uses it, and the aggregator choice, only
    while ``pool`` has no measured profile) (``switch``: the flag that picks another method)."""
    changes = settings_from(opts).changes()
    given = changes.get("recruit", {})
    measured = mode == "calibrated" and pool is not None and bool(pool.profiles)
    if changes.get("k") is not None and mode == "adaptive":  # (it was accepted, named in the method, not used)
        raise click.UsageError("--k (k) sets how many experts a node asks; adaptive recruiting adds experts until "
                               "their weights reach recruit.p, at most recruit.k_max: leave it out and give --set "
                               "recruit.k_max=N, or use --mode topk")
    for name in ("p", "k_max"):
        if given.get(name) is not None and mode != "adaptive":
            raise click.UsageError(f"recruit.{name} bounds adaptive recruiting; {mode} recruiting does not use it: "
                                   f"leave it out, or use --mode adaptive")
    if given.get("competence_weight") is not None and (mode in ("random", "global") or measured):
        what = "calibrated recruiting on measured profiles" if measured else f"{mode} recruiting"
        raise click.UsageError(f"--competence-weight (recruit.competence_weight) weighs the Symbolic-MoE draw; {what} "
                               f"does not use it: leave it out, or use {switch} symbolic-moe")
    if settings_from(opts).changes().get("aggregator_choice") is not None and measured:
        raise click.UsageError(f"--aggregator-choice (aggregator_choice) says how a node's aggregator is chosen; "
                               f"calibrated recruiting on measured profiles chooses it with each team: leave it out, "
                               f"or use {switch} symbolic-moe")
    if given.get("max_cost_per_item") is not None and mode != "calibrated":
        raise click.UsageError(f"--max-cost-per-item (recruit.max_cost_per_item) caps the calibrated router's teams; "
                               f"{mode} recruiting does not use it: leave it out, or use {switch} calibrated")
    if given.get("cost_lambda") is not None and mode == "random":
        raise click.UsageError(f"--cost-lambda (recruit.cost_lambda) weighs the experts' prices; random recruiting "
                               f"does not use it: leave it out, or use another {switch}")


def ready(pool: Pool) -> None:
    """Before a command sends anything: stop on a missing API key, warn about profiles unfit to route by."""
    pool.check_credentials()
    warn_about_profiles(pool)


def warn_about_profiles(pool: Pool) -> None:
    """One warning line per reason the pool's profiles are unfit to route by (``Pool.profile_warnings``)."""
    for line in pool.profile_warnings():
        warnings.warn(line, UserWarning, stacklevel=2)


def execute(orc: Orchestra, run: Callable[[str], Coroutine[Any, Any, RunResult]], opts: dict[str, Any],
            run_id: str | None = None, *, earlier: dict[str, Any] | None = None) -> NoReturn:
    """Run (``run(run_id)``) with the right view, print the outcome, and exit with the run's code;
    ``earlier``: what a resumed run had spent before (``RunStore.run_totals``).

    Ctrl-C ends with one line naming the run to resume, after what the run spent until then.
    """
    from orchestra.core import new_run_id, run_interruptibly
    from orchestra.view import LiveView, LogView, summary_line, terminal

    run_id = run_id or new_run_id()
    stdout_tty = sys.stdout.isatty()
    keep_stdout_for_json(opts["as_json"])
    view: LiveView | LogView | None
    if opts["as_json"]:
        view = None
    elif stdout_tty and not opts["quiet"]:
        view = LiveView(terminal(), verbose=opts["verbose"])
    elif not opts["quiet"] or opts["verbose"]:
        view = LogView(sys.stderr, verbose=opts["verbose"])
    else:
        view = None
    if view is not None:
        orc.events.subscribe(view.listen)
    try:
        if isinstance(view, LiveView):
            with view:
                result = run_interruptibly(run(run_id))
        else:
            result = run_interruptibly(run(run_id))
    except KeyboardInterrupt:
        saved = (f"its finished calls are saved; `{command('resume', run_id)}` finishes it" if orc.store is not None
                 else "nothing was kept (--no-store)")
        stopped = orc.ended(run_id)  # the run as it was recorded when it stopped
        if stopped is not None and opts["as_json"]:  # still one JSON object on stdout
            echo_json(stopped.dumps())
        elif stopped is not None and not opts["quiet"]:  # what it spent, as a failed run's last line says
            click.echo(summary_line(stopped, earlier=earlier), err=True)
        fail(f"interrupted run {run_id}; {saved}", 130)
    finish(result, opts, rich_output=stdout_tty, summary=summary_line(result, earlier=earlier))


def finish(result: RunResult, opts: dict[str, Any], *, rich_output: bool, summary: str) -> NoReturn:
    """Print a run's result (JSON, or the answer and ``summary``) and exit with its status code.

    A run that failed for a reason the user must fix ends with exactly one line on stderr.
    """
    from orchestra.hints import run_error
    from orchestra.view import ANSWER_CUT, CONTEXT_FULL, print_result, terminal

    # the outcome is decided: printed whole, then its exit code (a Ctrl-C as the run finished printed a done
    # result, then `error: interrupted` and exit 130, or died by SIGINT as the process exited)
    ignore_ctrl_c()
    stored = not opts.get("no_store")
    if opts["as_json"]:
        echo_json(result.dumps())
        if result.answer_cut:  # (on stderr, as without --json: answer_cut alone said so)
            click.echo(f"warning: {CONTEXT_FULL if result.context_full else ANSWER_CUT}", err=True)
        if result.status != "done":
            click.echo(f"error: {run_error(result, stored=stored)}", err=True)
    else:
        console = terminal(soft_wrap=not rich_output, force_terminal=rich_output or None)
        print_result(console, result, rich_output=rich_output, errors=terminal(stderr=True), stored=stored)
        if not opts["quiet"] and not result.user_error:
            click.echo(summary, err=True)
    sys.exit(result.exit_code)


# --- ask / run / validate ------------------------------------------------------------------


@main.command()
@click.argument("task")
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pool file (default: the embedded local pool).")
@click.option("--no-plan", is_flag=True, help="Run the task as one step.")
@run_options
@budget_options
@store_options
@output_options
def ask(task: str, pool: Path | None, no_plan: bool, **opts: Any) -> None:
    """Plan TASK, recruit experts, run them in batches and aggregate an answer. A TASK of `-` is
    read from standard input (a long task, or one from a file: `orchestra ask - < task.txt`)."""
    from orchestra.agents import Pool
    from orchestra.settings import assignments

    if no_plan and _assigns(assignments(list(opts.get("assignments", ()))), ("plan",)):
        raise ConfigError("--no-plan and --set plan both set plan; give it once")
    if task == "-":
        task = read_stdin_task()
    orc = make_orchestra(Pool.load(pool), opts)
    refuse_unused_recruiting(opts, orc.settings.mode, pool=orc.pool)
    meta = {"kind": "ask", "pool": str(pool.resolve()) if pool else None}
    execute(orc, lambda run_id: orc.arun(task, plan=False if no_plan else None, meta=meta, run_id=run_id), opts)


@main.command()
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="KEY=VALUE", help="A workflow input (repeatable).")
@click.option("--input-file", "input_files", multiple=True, metavar="KEY=PATH",
              help="A workflow input read from a UTF-8 text file, or standard input for PATH - (repeatable; a long "
                   "or multi-line value no command line can hold).")
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run on this pool instead of the workflow's own.")
@click.option("--resume", is_flag=True, help="A data-set workflow: go on with its earlier evaluation (finished "
                                            "items are counted, cut-off ones finished, only the rest run); "
                                            "another: finish its latest unfinished run in the store.")
@click.option("--retry-failed", is_flag=True, help="With --resume, a data-set workflow: an item whose run finished "
                                                  "with failed calls runs again, its recorded answers replayed (only "
                                                  "the failed calls, and what depends on them, are sent).")
@run_options
@budget_options
@store_options
@output_options
def run(workflow: Path, inputs: tuple[str, ...], input_files: tuple[str, ...], pool: Path | None, resume: bool,
        retry_failed: bool, **opts: Any) -> None:
    """Run a YAML workflow."""

    from orchestra.agents import Pool
    from orchestra.workflow import Workflow, parse_assignments
    from orchestra.workflow_run import arun_workflow, orchestra_for

    keep_stdout_for_json(opts["as_json"])
    flow = Workflow.load(workflow, pool=Pool.load(pool) if pool else None)
    if retry_failed and not resume:
        raise click.UsageError("--retry-failed sends an earlier evaluation's failed calls again: add --resume")
    if retry_failed and flow.spec.dataset is None:  # (one run's: `orchestra resume` takes its id)
        raise click.UsageError("--retry-failed retries the items of a data-set workflow; a single run's failed "
                               "calls: `orchestra resume RUN_ID --retry-failed` (`orchestra runs` lists the ids)")
    if resume and flow.spec.dataset is None:
        refuse_unused_in_resume(opts, given=bool(inputs or input_files or pool))
        resume_latest_run(flow, opts)
    if resume:  # (a mistyped --store would be a new, empty store: every item would run again)
        refuse_missing_store(opts["store_path"])
    given = parse_assignments([*inputs, *read_input_files(input_files)])
    ready(flow.pool)
    layer = settings_from(opts)
    unused = flow.unused_setting(layer.model_fields_set)
    if unused is not None:  # (no flag sets one of them: only --set does)
        raise click.UsageError(f"--set {unused[0]} does nothing in this workflow: {unused[1]}; leave it out")
    orc = orchestra_for(flow, layer, **orchestra_options(opts))
    if not any(step.recruit and step.recruit.mode for step in flow.spec.steps):  # (a step's own mode may use them)
        refuse_unused_recruiting(opts, orc.settings.mode, pool=orc.pool)
    if flow.spec.dataset is not None:
        from orchestra.workflow_run import aevaluate_workflow

        given_grader = layer.grader if "grader" in layer.model_fields_set else None  # --grader or --set grader=
        try:
            report = evaluate_interruptibly(
                lambda on_cancel: aevaluate_workflow(flow, given, orchestra=orc, grader=given_grader,
                                                     on_cancel=on_cancel, resume=resume, retry_failed=retry_failed),
                flow.spec.dataset.path, opts["as_json"],
                then=None if orc.store is None else "the same command with --resume goes on with this evaluation")
        except RunHeld as held:
            held_by_another_evaluation(held)
        print_report(report, f"{flow.name} on {flow.spec.dataset.path}", opts["as_json"])
        end_data_set(report, stored=orc.store is not None, evaluation=False)
        return
    flow.resolve_inputs(given)  # a missing or mistyped input: one line, before anything starts
    # (the inputs as given: the run records which took their defaults, for a resume --reload)
    execute(orc, lambda run_id: arun_workflow(flow, given, orchestra=orc, run_id=run_id), opts)


@main.command()
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Check it on this pool instead of the workflow's own (as `run --pool` runs it).")
@click.option("--json", "as_json", is_flag=True, help="Print what was checked as JSON (errors stay on stderr, exit 2).")
def validate(workflow: Path, pool: Path | None, as_json: bool) -> None:
    """Check a workflow file: schema, pool, agents, needs, cycles and template references."""
    from orchestra.agents import Pool
    from orchestra.workflow import Workflow

    flow = Workflow.load(workflow, pool=Pool.load(pool) if pool else None)
    kind = "plan: auto" if flow.spec.plan == "auto" else f"{len(flow.spec.steps)} step(s)"
    items: int | None = None
    limit: int | None = None
    if flow.spec.dataset is not None:  # its data set is read as a run would read it
        from orchestra.datasets import load_dataset
        from orchestra.grading import check_grader, get_grader

        dataset = load_dataset(flow.path.parent / flow.spec.dataset.path)
        items, limit = len(dataset.items), flow.spec.dataset.limit
        check_grader(get_grader(flow.spec.dataset.grader or flow.settings().grader), dataset.items[:limit],
                     dataset.path)  # (as a run would: one that could grade no answer correct is refused)
        kind += f", a data set of {items} item(s)"
        if limit and limit < items:
            kind += f", the first {limit} run (limit)"
    from orchestra.terminal_text import counted

    if as_json:
        echo_json(json.dumps({"ok": True, "workflow": flow.name, "file": str(workflow),
                              "plan": "auto" if flow.spec.plan == "auto" else None,
                              "steps": [step.id for step in flow.spec.steps], "pool": flow.pool.name,
                              "agents": [agent.name for agent in flow.pool.agents], "dataset_items": items,
                              "limit": limit}))
        return
    agents = counted(len(flow.pool.agents), "agent")
    click.echo(f"{workflow}: ok ({flow.name}: {kind}, pool {flow.pool.name} with {agents})")


# --- pools and profiles --------------------------------------------------------------------


@main.command()
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pool file (default: the embedded local pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def agents(pool: Path | None, as_json: bool) -> None:
    """List the pool's agents and a summary of their skill profiles."""
    from rich.table import Table

    from orchestra.agents import Pool
    from orchestra.view import skills_cell, terminal

    loaded = Pool.load(pool)
    warn_about_profiles(loaded)
    settings = loaded.settings
    table = loaded.skill_table(settings.recruit)  # (γ at the pool's temperature, as its runs compute it)
    aggregator = loaded.choose_aggregator(table).name
    # (the header named one aggregator where calibrated routing, or a per-node choice, picks each team's)
    chosen = "" if settings.aggregator or loaded.aggregator else (
        " (calibrated teams choose their own)" if settings.mode == "calibrated" and loaded.profiles
        else " (each node chooses its own)" if settings.aggregator_choice == "per-node" else "")
    rows: list[dict[str, Any]] = []
    for agent in loaded.agents:
        profile = loaded.profiles.get(agent.name)
        top = profile.top_sums() if profile is not None else []
        estimated = profile.top_estimates() if profile is not None else []
        rows.append({"name": agent.name, "model": agent.model.name, "declared_skills": list(agent.skills),
                     "profiled": profile is not None, "accuracy": profile.accuracy if profile else None,
                     "competence": round(table.competence[agent.name], 4),
                     "aggregation_score": profile.aggregation_score if profile else None,
                     "aggregation_stderr": profile.aggregation_stderr if profile else None,
                     "aggregation_items": profile.aggregation_items if profile else None,
                     "top_skills": [f"{k} {v:+d}" for k, v in top],
                     "top_estimates": [{"skill": skill, "estimate": round(estimate, 4), "items": items}
                                       for skill, estimate, items in estimated],
                     "profile_items": profile.provenance.items if profile else None})
    if as_json:
        click.echo(json.dumps({"pool": loaded.name, "aggregator": aggregator, "agents": rows}, indent=2))
        return
    out = Table(title=f"pool {loaded.name} · aggregator: {aggregator}{chosen}")
    for column in ("agent", "model", "γ", "accuracy", "aggregation", "top skills (estimate, items) / declared"):
        out.add_column(column)
    for row in rows:  # (as profile shows them; a profile written before estimates has its ±1 sums alone)
        skills = skills_cell(row["declared_skills"], loaded.profiles.get(row["name"]))
        out.add_row(row["name"], row["model"], f"{row['competence']:.3f}",
                    "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}",
                    aggregation_cell(loaded.profiles.get(row["name"])), skills)
    terminal().print(out)


@main.command()
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Validation set (JSONL).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the profiles (default: the pool's profiles folder).")
@click.option("--grader", default="auto", type=click.Choice(GRADER_NAMES))
@click.option("--aggregation-items", type=click.IntRange(min=0),
              help="Items in the aggregation benchmark (default: every usable item; 0: none).")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--merge-similarity", type=FiniteRange(min=0, max=1),
              help="Name similarity at which keyword variants merge into one skill (default 0.6 lexical, 0.85 "
                   "with an embedding matcher; 1: never).")
@click.option("--resume", is_flag=True, help="Go on with an interrupted profile: answers recorded for the same "
                                            "calls are reused, only the rest are sent.")
@store_options
@profile_budget_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profile(pool: Path, data: Path, out: Path | None, grader: str, aggregation_items: int | None, seed: int,
            merge_similarity: float | None, resume: bool, store_path: Path | None, no_store: bool,
            as_json: bool, max_calls: int | None, max_cost: float | None, max_tokens: int | None) -> None:
    """Measure every agent on a validation set and save skill profiles (--max-calls, --max-cost and
    --max-tokens bound what the command sends, answers --resume reuses aside; a pool's budget bounds
    each run of the other commands)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from orchestra.agents import Pool
    from orchestra.budget import Budget
    from orchestra.core import run_interruptibly
    from orchestra.datasets import load_dataset
    from orchestra.errors import BudgetExceeded, ProfilingIncomplete
    from orchestra.profile import stale_profiles
    from orchestra.profiling import ProfilingSpent, aprofile, save_profiles
    from orchestra.store import RunStore
    from orchestra.view import terminal

    if resume and no_store:
        raise ConfigError("--resume reuses the answers recorded in the run store; drop --no-store")
    keep_stdout_for_json(as_json)
    loaded = Pool.load(pool, profiles=False)  # (measured anew: one of an agent since removed stops nothing)
    loaded.check_credentials()
    budget = _whole_budget({"max_calls": max_calls, "max_cost": max_cost, "max_tokens": max_tokens})
    if budget is None and loaded.settings.budget != Budget():  # (it bounds a run; a profile is none)
        click.echo("note: the pool's budget bounds each run of ask, eval and run, not a profile; give profile "
                   "--max-calls, --max-cost or --max-tokens to bound this one", err=True)
    dataset = load_dataset(data)
    target = (out or loaded.profiles_dir or Path("skills/profiles") / loaded.name).resolve()
    writable_folder(target, "the profiles")  # before any call is paid for
    if resume:
        refuse_missing_store(store_path)
    # every answer is recorded as it comes (in the store's cache, apart from the runs' entries), so an
    # interrupted profile loses nothing: --resume reads them back
    advise_store(store_path)
    if store_path is not None and not no_store:
        refuse_missing_folder(store_path)
    store = None if no_store else RunStore(store_path)
    if store is not None and store.read_only:
        raise ConfigError(f"the run store {store.path} cannot be written ({store.unwritable}), and profile records "
                          "its answers there as they come; give --store a writable file, or --no-store")
    answers = None if store is None else store.cache(namespace="profile:", reads=resume)
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=terminal(stderr=True), disable=as_json) as progress:
        bars: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        stopped: list[ProfilingSpent] = []

        def spent_json(spent: ProfilingSpent, interrupted: bool, error: str | None) -> None:
            if as_json:  # (the same keys as a finished profile's, its profiles aside)
                echo_json(json.dumps({"interrupted": interrupted, "error": error, "written": [],
                                       "reused": spent.reused, "calls": spent.calls, **_usage_json(spent.usage)},
                                      indent=2))

        try:
            report = run_interruptibly(aprofile(loaded, dataset, grader=grader, aggregation_items=aggregation_items,
                                                seed=seed, progress=update, matcher=loaded.settings.matcher.build(),
                                                keywords=loaded.settings.keywords,  # (as its runs extract them)
                                                merge_similarity=merge_similarity, cache=answers,
                                                budget=budget, on_stop=stopped.append))
        except KeyboardInterrupt:
            progress.stop()
            if stopped:
                spent_json(stopped[0], True, "interrupted")
            fail("interrupted; no profiles were written; " + ("nothing was kept (--no-store)" if answers is None else
                 "the answers so far are saved: the same command with --resume goes on with this profile"), 130)
        except ProfilingIncomplete as error:
            progress.stop()
            if stopped:
                spent_json(stopped[0], False, str(error))
            flag = BUDGET_FLAGS[error.cause.limit] if isinstance(error.cause, BudgetExceeded) else None
            if answers is None:
                then = f"raise {flag} and profile again" if flag else "fix the cause and profile again"
            elif flag:  # (a resume's limit bounds what it sends, not the answers it reuses: "raise it" said otherwise)
                then = (f"the answers so far are saved: the same command with --resume sends only the calls not "
                        f"answered, up to {flag} more")
            else:
                then = ("the answers so far are saved: once the cause is fixed, the same command with --resume sends "
                        "only the calls not answered")
            fail(f"{error}; {then}", error.exit_code)
        except OrchestraError as error:  # (a budget, a matcher's endpoint: its one line follows, as for any command)
            progress.stop()
            if stopped:
                spent_json(stopped[0], False, str(error))
            raise
    try:
        written = save_profiles(report, target)
    except OSError as error:
        fail(f"cannot write the profiles to {target}: {error.strerror or error}"
             + ("" if answers is None else "; every answer is saved: --resume writes them without a call"))
    if not report.aggregation_items:  # (it said only "aggregation benchmark: 0 item(s)"; show then cited 0.50)
        click.echo(f"note: aggregation skill was not measured: {_no_aggregation_items(aggregation_items, loaded)}; "
                   "calibrated recruiting assumes 0.50 for every agent until it is", err=True)
    stale = stale_profiles(target, loaded.names)
    if stale:  # the pool would not load with them there
        click.echo(f"note: {target} also holds profiles of agents {pool} does not have: {stale}; move those files "
                   "out of the folder", err=True)
    if report.profiles and not any(profile.skill_counts for profile in report.profiles.values()):
        keywords = loaded.settings.keywords  # (recruiting would rank these agents by overall accuracy alone)
        click.echo(f"note: the profiles have no skills: no keyword was named by {keywords.min_count} of an item's "
                   f"{keywords.samples} samples, so recruiting ranks these agents by overall accuracy alone; set "
                   "keywords.min_count (or the keyword model's temperature) under the pool's settings: and profile "
                   "again", err=True)
    if loaded.profiles_dir is None or loaded.profiles_dir.resolve() != target:  # (profiles nobody would read)
        click.echo(f"note: {pool} reads its profiles from {loaded.profiles_dir or 'nowhere (it has no profiles: line)'}"
                   f"; to recruit by these, set `profiles: {target}` in it", err=True)
    if as_json:
        echo_json(json.dumps({"interrupted": False, "error": None, "written": [str(p) for p in written],
                               "aggregation_items": report.aggregation_items, "reused": report.reused,
                               "calls": report.calls, **_usage_json(report.usage),
                               "merged_skills": report.vocabulary.merged,
                               "answered_alike": [{"agents": [first, second], "items": count}
                                                  for first, second, count in report.answered_alike],
                               "profiles": {n: p.model_dump(mode="json") for n, p in report.profiles.items()}},
                              indent=2))
        return
    table = Table(title=f"profiles of {loaded.name} on {dataset.path} ({len(dataset)} items)")
    for column in ("agent", "accuracy", "γ", "aggregation", "best skills (estimate, items)"):
        table.add_column(column)
    for name, prof in report.profiles.items():
        ranked = sorted(prof.estimates.items(), key=lambda kv: (-kv[1][0], kv[0]))[:3]
        best = ", ".join(f"{k} {p:.2f} ({prof.skill_counts[k][1]})" for k, (p, _) in ranked)
        table.add_row(name, f"{prof.accuracy:.2f}", f"{prof.competence:.3f}", aggregation_cell(prof), best)
    terminal().print(table)
    for line in report.vocabulary.explain():
        click.echo(f"merged variants: {line}")
    click.echo(f"aggregation benchmark: {report.aggregation_items} item(s)")
    if resume:
        click.echo(f"reused {report.reused} recorded answer(s); sent the rest")
    click.echo(f"wrote {len(written)} profiles to {target}")
    from orchestra.terminal_text import counted

    usage = report.usage
    click.echo(f"profile · {counted(report.calls, 'call')} · {counted(usage.requests, 'request')} · "
               f"{usage.prompt_tokens + usage.completion_tokens:,} tokens · {usd_exact(usage.cost_usd)}")


def _usage_json(usage: Usage) -> dict[str, Any]:
    """A profile's spending as ``--json`` writes it."""
    return {"requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "cost_usd": usage.cost_usd}


def _no_aggregation_items(limit: int | None, pool: Pool) -> str:
    """Why a profile's aggregation benchmark had no item (``limit``: ``--aggregation-items``), and what to give it."""
    if limit == 0:
        return "--aggregation-items 0 left it out (leave the flag out to measure it)"
    if len(pool.agents) < 3:
        return (f"its items need one right and two wrong answers, and {pool.name} has {len(pool.agents)} "
                "agent(s): profile a pool of three agents or more")
    return ("no item got one right answer and two wrong ones from the agents, as its items need: give a data set with "
            "questions some of the agents get wrong")


def aggregation_cell(profile: SkillProfile | None) -> str:
    """``0.80 ±0.03`` (score and standard error), ``not measured`` for a profile without it, ``-``
    without a profile."""
    if profile is None:
        return "-"
    if profile.aggregation_score is None:  # (not a score of 0.50: recruiting assumes that)
        return "not measured"
    error = f" ±{profile.aggregation_stderr:.2f}" if profile.aggregation_stderr is not None else ""
    return f"{profile.aggregation_score:.2f}{error}"


@main.command(name="eval")
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pool file (default: the embedded local pool).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Test set (JSONL).")
@click.option("--method", type=click.Choice(list(METHOD_NAMES)),
              help="A baseline or method preset (default: the pool's settings, which default to calibrated); "
                   "--k, --mode and --aggregate win over it.")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N items.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write each item's answer to this JSONL file as its run finishes (the report then leaves "
                   "them out).")
@click.option("--sweep", is_flag=True, help="Run every method, and the calibrated router at each cost preference "
                                            "(--lambdas): accuracy, cost, cost per correct answer and calls for each, "
                                            "with the accuracy/cost frontier marked (no request is asked twice: a "
                                            "point's cost still counts the answers it took from another).")
@click.option("--lambdas", metavar="L1,L2,...", help="The cost preferences λ a sweep tries (default "
                                                     "0,0.01,0.02,0.05,0.1,0.2,0.5,1); a --cost-lambda beside "
                                                     "them weighs prices in the other methods only.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="With --sweep: write the frontier as an HTML page (a chart and the table) to this file.")
@click.option("--resume", is_flag=True,
              help="Go on with this data set's earlier evaluation (same method and settings) from the store: "
                   "finished items are counted as recorded, cut-off ones resumed, only the rest run.")
@click.option("--retry-failed", is_flag=True,
              help="With --resume: finished items whose calls failed after their retries run again, their recorded "
                   "answers reused: only the failed calls (and what depends on them) are sent.")
@choice_options
@settings_options
@budget_options
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(pool: Path | None, data: Path, method: str | None, limit: int | None, output: Path | None,
             sweep: bool, lambdas: str | None, plot: Path | None, resume: bool, retry_failed: bool, as_json: bool,
             **opts: Any) -> None:
    """Accuracy, cost and time of a method on a labelled data set (or, with --sweep, of every method)."""
    from orchestra.agents import Pool
    from orchestra.datasets import load_dataset
    from orchestra.evaluate import METHODS, aevaluate, check_output, html_page
    from orchestra.settings import assignments

    if plot is not None and not sweep:
        raise click.UsageError("--plot draws a sweep's frontier: add --sweep")
    if plot is not None:  # (before the sweep is paid for)
        from orchestra.store import default_store_path

        store = None if opts.get("no_store") else opts.get("store_path") or default_store_path()
        check_output(plot, "the plot", "an earlier plot (an HTML page)", html_page,
                     {"the data set": data, "the run store": store, "the pool file": pool}, flag="--plot")
    if lambdas is not None and not sweep:  # (a plain eval would drop them: use --cost-lambda for one λ)
        raise click.UsageError("--lambdas are the points of a sweep: add --sweep (or give one λ with --cost-lambda)")
    if sweep and (method or output or resume or retry_failed):  # (before --retry-failed's own: it asked for --resume)
        raise click.UsageError("--sweep runs every method: leave out --method, --output, --resume and --retry-failed "
                               "(a sweep does not resume: `--method M --resume --retry-failed`, with the sweep's other "
                               "flags, retries one method's failed calls)")
    if retry_failed and not resume:
        raise click.UsageError("--retry-failed retries the failed calls of an earlier evaluation: add --resume")
    assigned = assignments(list(opts["assignments"]))
    if sweep and (opts["mode"] or opts["aggregate"] or _assigns(assigned, ("mode",))
                  or _assigns(assigned, ("aggregate",))):
        # (every method would recruit or aggregate alike: two points were one method, named alike)
        raise click.UsageError("--sweep compares the methods, each with its own recruiting and aggregation: leave "
                               "out --mode and --aggregate")
    if _assigns(assignments(list(opts["assignments"])), ("plan",)):  # (it would be accepted, then not used)
        raise click.UsageError("eval answers each item in one step, without a plan: leave out --set plan")
    dataset = load_dataset(data)
    if resume:  # (a mistyped --store would be a new, empty store: every item would run again)
        refuse_missing_store(opts["store_path"])
    budget = _whole_budget(opts)  # the budget flags bound the evaluation (a sweep: each method's), not each item
    keep_stdout_for_json(as_json)
    orc = make_orchestra(Pool.load(pool), opts)
    if not sweep:
        refuse_unused_recruiting(opts, opts["mode"] or (METHODS[method][0] if method in METHODS else None)
                                 or orc.settings.mode, switch="--method", pool=orc.pool)
    if sweep:
        run_sweep(orc, dataset, lambdas, plot, limit, as_json, opts, budget)
        return
    # the flags win over the method's preset; both over the pool's settings
    try:
        report = evaluate_interruptibly(
            lambda on_cancel: aevaluate(orc, dataset, method=method, limit=limit, output=output, k=opts["k"],
                                        mode=opts["mode"], aggregate=opts["aggregate"], budget=budget,
                                        on_cancel=on_cancel, resume=resume, retry_failed=retry_failed),
            dataset.path, as_json,
            then=None if orc.store is None else "the same command with --resume goes on with this evaluation")
    except RunHeld as held:
        held_by_another_evaluation(held)
    print_report(report, f"{report.method} on {dataset.path}", as_json)
    end_data_set(report, stored=orc.store is not None, evaluation=True)


def held_by_another_evaluation(held: RunHeld) -> NoReturn:
    """An evaluation (or a data-set workflow) whose item's run another process is running: say to wait
    for that evaluation (it advised `orchestra resume ITEM_RUN --force`: one item's run, not the
    evaluation, and --force is refused while that process lives)."""
    fail(f"{held.problem}; another evaluation is going on with this one's runs: wait for it to end (where its "
         "process is gone, its lease runs out within 30 s), then run this command again", held.exit_code)


def evaluate_interruptibly(work: Callable[[Callable[[EvalReport], None]], Coroutine[Any, Any, EvalReport]],
                           source: str, as_json: bool, *, then: str | None) -> EvalReport:
    """Run an evaluation of the data set ``source`` (``work(on_cancel)``); at Ctrl-C print the report
    of the items finished so far, then the one line saying how to go on (``then``; None: nothing
    was kept), and exit 130."""
    from orchestra.core import run_interruptibly

    stopped: list[EvalReport] = []
    try:
        return run_interruptibly(work(stopped.append))
    except KeyboardInterrupt:
        if stopped:
            print_report(stopped[0], f"{stopped[0].method} on {source}: interrupted after {stopped[0].items} item(s)",
                         as_json)
        fail(f"interrupted; finished calls are saved: {then}" if then else "interrupted; nothing was kept (--no-store)",
             130)


def end_data_set(report: EvalReport, *, stored: bool, evaluation: bool) -> None:
    """After a data set's report: exit 3 with a hint when its budget stopped it; with the first
    unfinished item's code (2 a rejected key, 3 its own budget, else 1) when a run did not finish.
    The report stands either way; a data set with unfinished runs is not a clean pass. Every run
    finished but some calls failed: a warning that the accuracy is not the method's own (exit 0)."""
    from orchestra.hints import budget_hint

    if report.budget_exceeded:
        hint = budget_hint(report.budget_exceeded, None, stored=stored, evaluation=evaluation)
        fail(f"{report.budget_exceeded} ({report.failed} of {report.items} items unfinished)"
             + (f"; {hint}" if hint else ""), 3)
    if report.failed:
        from orchestra.prompts import RENDER_FAILED

        hint = ""
        if stored and report.first_failure_run and RENDER_FAILED in (report.first_failure or ""):
            # (an edited workflow is another one: `run --resume` after the fix ran every item again)
            hint = (f"; fix the workflow, then `{command('resume', report.first_failure_run, '--reload')}` finishes "
                    "that item with its answers kept (`orchestra runs` lists the other unfinished items' runs)")
        elif stored and "nothing can resume it" not in (report.first_failure or ""):
            # (an endpoint that failed every item: the line named the error, not how to go on once it is fixed)
            hint = ("; once that is fixed, the same command with --resume finishes the unfinished items, the calls "
                    "answered before reused")
        fail(f"{report.failed} of {report.items} run(s) did not finish; first: {report.first_failure}{hint}",
             report.failure_exit or 1)
    if report.failed_calls:  # (every run finished, some without an expert: the accuracy reads as the method's)
        warnings.warn(lost_calls_line(report, stored=stored), UserWarning, stacklevel=2)


def lost_calls_line(report: EvalReport, *, stored: bool) -> str:
    """The line saying that calls of an evaluation whose runs all finished failed after their retries,
    to which models, what that did to its accuracy, and how to send them again (``stored``: with
    ``--resume --retry-failed``). Keyword samples alone, with no node left without keywords, change
    no answer's method: the accuracy is the method's, on experts chosen from fewer samples."""
    from orchestra.terminal_text import counted

    by_model = ", ".join(f"{model} {failed['calls']}" for model, failed in report.failed_by_model.items())
    failed = f"{counted(report.failed_calls, 'call')} failed after their retries" + (f" ({by_model})" if by_model
                                                                                     else "")
    again = ("once those endpoints are fixed, the same command with --resume --retry-failed sends only those calls "
             "again (and what depends on them), the other answers reused" if stored
             else "fix those endpoints and evaluate again")
    keywords = report.failed_keyword_calls
    if keywords == report.failed_calls and not report.skill_extraction_failures:
        return (f"{failed}, all of them keyword samples: every node still had the keywords of its other samples, so "
                f"the accuracy {report.accuracy:.3f} is the method's, its experts chosen on fewer samples; {again}")
    of_them = f", {keywords} of them keyword samples" if keywords else ""
    return f"{failed}{of_them}: the accuracy {report.accuracy:.3f} is not the method's own; {again}"


def _whole_budget(opts: dict[str, Any]) -> Budget | None:
    """The budget the command line's --max-calls, --max-cost and --max-tokens (or ``--set budget.*``,
    the same settings) give a whole data set (each run may spend as much, within it); None if none
    is given."""
    from orchestra.settings import Settings

    limits = settings_from(opts).changes().get("budget") or {}
    if not limits:
        return None
    # validated as the other commands' flags are (``--max-cost nan`` is one line, not a traceback)
    return Settings.layer({"budget": {"max_calls": None, "max_cost_usd": None, "max_tokens": None, **limits}},
                          where="command line").budget


def writable_folder(folder: Path, what: str) -> None:
    """Make the folder ``what`` goes to, before the work that makes it: one that cannot be made (a
    file in the way, no permission) is refused in one line while nothing is spent yet."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else error.strerror or str(error)
        raise ConfigError(f"cannot write {what} to {folder}: {why}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} to {folder}: it is not writable")


def _writable(path: Path) -> bool:
    """Whether a file can be written at ``path`` (an existing one replaced), without writing it."""
    if path.exists():
        return path.is_file() and os.access(path, os.W_OK)
    return path.parent.is_dir() and os.access(path.parent, os.W_OK)


def parse_lambdas(text: str | None) -> tuple[float, ...]:
    """``0,0.05,0.2`` as numbers (the default range when None); a bad list is a usage error."""
    from orchestra.frontier import LAMBDAS

    if text is None:
        return LAMBDAS
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:  # (an empty entry, "0.1,,0.2", too: it was dropped without a word)
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--lambdas") from None
    if not values or any(not 0 <= v < math.inf for v in values):  # (inf: the sweep was paid, then refused)
        raise click.BadParameter("give one or more finite numbers >= 0, e.g. 0,0.05,0.2", param_hint="--lambdas")
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:  # (the same point would be evaluated, and paid for, twice)
        raise click.BadParameter(f"{twice:g} is given twice", param_hint="--lambdas")
    return values


def run_sweep(orc: Orchestra, dataset: Dataset, lambdas: str | None, plot: Path | None, limit: int | None,
              as_json: bool, opts: dict[str, Any], budget: Budget | None = None) -> None:
    """``eval --sweep``: every method and cost preference, as a table (or JSON) and an HTML page.
    Ctrl-C prints the points evaluated in full so far (no page), then exits 130."""
    from orchestra.core import run_interruptibly
    from orchestra.frontier import asweep, sweep_size

    if plot is not None and not _writable(plot):  # found out before the sweep's calls, not after them
        raise ConfigError(f"cannot write the plot to {plot}: no such folder, or no permission to write there")
    chosen = parse_lambdas(lambdas)
    if not orc.pool.priced():  # (every point "on the frontier" at $0, with no word why)
        warnings.warn("no agent's model has a price: every point costs $0, so the frontier weighs accuracy alone and "
                      "every λ ranks alike (give prices: [input, output] per million tokens in the pool)",
                      UserWarning, stacklevel=1)
    items = len(dataset.items[:limit] if limit else dataset.items)
    stopped: list[list[SweepPoint]] = []
    try:
        points = run_interruptibly(asweep(orc, dataset, lambdas=chosen, limit=limit, k=opts["k"],
                                          aggregate=opts["aggregate"], budget=budget, on_cancel=stopped.append))
    except KeyboardInterrupt:
        done = stopped[0] if stopped else []
        whole = [point for point in done if not point.interrupted]
        print_sweep(done, dataset, items, None, as_json, interrupted=f"interrupted after {len(whole)} of "
                                                                     f"{sweep_size(chosen)} points")
        kept = ("nothing was kept (--no-store)" if orc.store is None else "finished calls are saved (a sweep "
                "starts afresh, but `orchestra eval --method M --resume`, with the sweep's other flags, goes on with "
                "one method's evaluation from them)")
        shown = ("no point was evaluated in full" if not whole else
                 f"the points {'printed' if as_json else 'above'} are the ones evaluated in full")
        if len(whole) < len(done):
            shown += f", and {done[-1].method}, cut off, with what it had spent"
        fail(f"interrupted; {kept}; {shown}", 130)
    print_sweep(points, dataset, items, plot, as_json)


def print_sweep(points: list[SweepPoint], dataset: Dataset, items: int, plot: Path | None, as_json: bool, *,
                interrupted: str | None = None) -> None:
    """A sweep's points (each over ``items`` items) as a table (or JSON), the page written to ``plot``;
    exit 1 if a run did not finish."""
    from rich.table import Table

    from orchestra.frontier import calls_shown, failed_calls_warning, frontier_html
    from orchestra.view import terminal

    if plot is not None:
        try:
            plot.write_text(frontier_html(points, f"accuracy/cost frontier on {dataset.path}"), encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot write the plot to {plot}: {error.strerror or error}") from None
    if as_json:
        echo_json(json.dumps({"dataset": dataset.path, "points": [p.to_json() for p in points],
                               "spent_usd": dollars(sum(p.spent_usd for p in points)),
                               "reused_calls": sum(p.reused_calls for p in points),
                               "plot": str(plot) if plot else None, "interrupted": interrupted is not None},
                              indent=2))
    else:
        table = Table(title=f"accuracy/cost frontier on {dataset.path} ({items} items)"
                            + (f": {interrupted}" if interrupted else ""))
        rows = []
        # each column to the same decimals, its amounts set side by side
        costs = usd_alike(*(p.cost_usd for p in points)) if points else []
        per_corrects = usd_alike(*(p.cost_per_correct_usd or 0.0 for p in points)) if points else []
        for p, cost, per_correct in zip(points, costs, per_corrects):
            if p.cost_per_correct_usd is None:
                per_correct = "-"
            accuracy = f"{p.accuracy:.3f}" + (f" ({p.items - p.failed} of {p.items} finished)" if p.failed else "")
            method = p.method + (f" (cut off after {p.items} items)" if p.interrupted else "")
            rows.append((method, accuracy, cost, per_correct, calls_shown(p), str(p.saved_calls),
                         "●" if p.on_frontier else ""))
        for column in ("method", "accuracy", "cost", "per correct", "calls", "saved", "frontier"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            table.add_row(*row)
        console = terminal()
        wide = console.measure(table, options=console.options.update(max_width=10_000)).maximum
        # its rows whole, wider than the terminal if need be: 80 columns cut a cost to "$0.000077…" and a
        # method to "symbolic-m…" (and fixed widths for the numbers left the method no room at all)
        (terminal(width=wide) if wide > console.width else console).print(table)
        reused = sum(p.reused_calls for p in points)
        if reused:  # (each point's cost counts them, so it is not what the sweep spent)
            spent = usd_exact(sum(p.spent_usd for p in points))
            click.echo(f"no request is asked twice in a sweep: {reused} of the points' calls were taken from the point "
                       "that made them (each item's keyword samples, and the calls of teams chosen again), not sent "
                       f"again; each point's cost counts them, as the method alone would pay them; the sweep spent "
                       f"{spent}")
        if plot is not None:
            click.echo(f"wrote the frontier to {plot}")
    lost = failed_calls_warning(points)
    if lost:  # (a point that lost calls to a failing endpoint read as the method's own, exit 0)
        warnings.warn(lost, UserWarning, stacklevel=2)
    unfinished = [p for p in points if p.failed]
    if unfinished and not interrupted:
        first = unfinished[0]
        left_off = f"{first.failed} of {first.items} items of {first.method} unfinished: it is left off the frontier"
        if len(unfinished) > 1:  # (only the first was named, while every one of them was left off)
            left_off = (f"items of {', '.join(p.method for p in unfinished)} unfinished ({first.failed} of "
                        f"{first.items} of {first.method}): they are left off the frontier")
        if first.budget_exceeded:
            from orchestra.hints import BUDGET_FLAGS

            flag = next((f for limit, f in BUDGET_FLAGS.items() if f"budget {limit}=" in first.budget_exceeded), None)
            fail(f"{first.budget_exceeded} ({left_off}); "
                 + (f"raise it with {flag} and sweep again" if flag else "sweep again with a larger budget"), 3)
        fail(f"{left_off}; each method's items must all finish for its point to count", first.failure_exit or 1)


def print_report(report: EvalReport, title: str, as_json: bool) -> None:
    """An evaluation report as JSON or a table."""
    if as_json:
        echo_json(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    from orchestra.view import literal, terminal

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")  # (an endpoint's URL whole, not cut to "…")
    # (to the same decimals: `$0.00492` spent beside `$0.004299` per correct answer)
    cost, per_correct = usd_alike(report.cost_usd, report.cost_per_correct_usd or 0.0)
    if report.cost_per_correct_usd is None:
        per_correct = "-"
    accuracy = f"{report.accuracy:.3f}"
    if report.failed:  # (a spent budget can leave every item unanswered: 0.000 alone reads as all wrong)
        accuracy += f" ({report.items - report.failed} of {report.items} finished; the rest count as wrong)"
    for metric, value in [("items", str(report.items)), ("accuracy", accuracy),
                          ("calls", str(report.calls) + (f" ({report.failed_calls} failed after their retries"
                                                         + (f", {report.failed_keyword_calls} of them keyword samples"
                                                            if report.failed_keyword_calls else "") + ")"
                                                         if report.failed_calls else "")),
                          *([("answered from the cache (free)", f"{report.cache_hits} calls")]
                            if report.cache_hits else []),
                          # (runs of a sweep's point: resumed, their report left those samples out of the cost)
                          *([("calls from another point of a sweep",
                              f"{report.reused_calls} calls ({usd_exact(report.reused_usd)}, paid there)")]
                            if report.reused_calls else []),
                          ("requests", str(report.requests)),
                          ("cost", cost),
                          ("cost per correct answer", per_correct), ("time", f"{report.elapsed_s:.1f} s"),
                          ("model loads", ", ".join(f"{k} x{v}" for k, v in report.model_loads.items()) or "-"),
                          ("calls saved by confident teams", str(report.saved_calls)),
                          ("unfinished runs", str(report.failed)
                           + (f" (and {report.cut_off} cut off, to resume)" if report.cut_off else "")),
                          *([("from the earlier evaluation", f"{report.reused} finished, {report.resumed} resumed"
                              + (f", {report.retried} retried (their failed calls sent again)" if report.retried
                                 else ""))]
                            if report.reused or report.resumed or report.retried else []),
                          ("skill extraction failures", str(report.skill_extraction_failures)),
                          *([("items matching no profiled skill",
                              f"{report.unmatched_skill_items} (recruited on overall accuracy)")]
                            if report.unmatched_skill_items else []),
                          *([("aggregators failed (voted instead)", str(report.voted_instead))]
                            if report.voted_instead else [])]:
        table.add_row(metric, value)
    if report.failed_by_model:  # (an endpoint's error may hold brackets: not Rich markup)
        table.add_row("failed calls by model", literal("; ".join(f"{model} {failed['calls']} ({failed['first_error']})"
                                                                for model, failed in report.failed_by_model.items())))
    if len(report.per_category) > 1:  # (one category: the accuracy above)
        for category, numbers in report.per_category.items():
            table.add_row(f"accuracy: {category}", f"{numbers['accuracy']:.3f} of {int(numbers['items'])}")
    terminal().print(table)


# --- runs: list, show, resume --------------------------------------------------------------


@main.command()
@click.option("--limit", default=20, type=click.IntRange(min=1), show_default=True, help="How many runs to list.")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(limit: int, store_path: Path | None, as_json: bool) -> None:
    """List recorded runs, newest first."""
    from datetime import datetime

    from rich.table import Table

    from orchestra.terminal_text import one_line
    from orchestra.view import terminal

    store = existing_store(store_path)
    records = store.runs(min(limit, 2**63 - 1))  # (past SQLite's largest integer: all of them, not an OverflowError)
    if as_json:
        # ("run_id" as every other --json names it; "id" as this one always did)
        click.echo(json.dumps([{"run_id": r.id, "id": r.id, "status": r.status, "task": r.task, "item": r.item,
                                "served": r.served, "created": r.created, "resumes": r.resumes,
                                **store.run_totals(r.id)}
                               for r in records], indent=2))
        return
    rows = []
    every = [store.run_totals(record.id) for record in records]
    costs = usd_alike(*(totals["cost_usd"] for totals in every)) if every else []  # (`$0.0001` beside `$0.000065`)
    for record, totals, cost in zip(records, every, costs):
        rows.append((record.id, record.status, f"{datetime.fromtimestamp(record.created):%Y-%m-%d %H:%M}",
                     str(totals["calls"]) + (f" ({totals['failed_calls']} failed)" if totals["failed_calls"] else ""),
                     str(totals["requests"]), cost,
                     (f"item {one_line(record.item)} · " if record.item else "")
                     + (f"served {one_line(record.served)} · " if record.served else "")
                     + " ".join(record.task.split())[:60]))
    # every column but the task keeps its whole value (a run id is what `resume` and `show` take);
    # the task gives way on a narrow terminal (a data-set item's id comes first, so it stays)
    columns = ["run", "status", "when", "calls", "requests", "cost"]
    widths = {column: max(len(value) for value in (column, *(row[index] for row in rows)))
              for index, column in enumerate(columns)}
    console = terminal()

    def room() -> int:  # what is left for the task (3: a cell's padding and edge)
        return console.width - sum(widths[c] for c in columns) - 3 * (len(columns) + 1) - 1

    for column in ("requests", "when", "cost", "calls"):  # on a narrow terminal these go first, whole
        if room() >= 8:
            break
        columns.remove(column)
    space = room()
    table = Table()
    for column in columns:
        table.add_column(column, no_wrap=True, min_width=widths[column])
    if space >= 8:  # (on a terminal narrower still, the ids and statuses alone, whole)
        table.add_column("task", no_wrap=True)
    shown = [("run", "status", "when", "calls", "requests", "cost").index(c) for c in columns]
    for row in rows:
        task = row[-1] if len(row[-1]) <= space else row[-1][:space - 1] + "…"
        table.add_row(*(row[i] for i in shown), *([task] if space >= 8 else []))
    console.print(table, crop=False)


@main.command()
@click.argument("run_id")
@click.option("--export", type=click.Choice(["jsonl"]), help="Write everything recorded as JSON lines.")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(run_id: str, export: str | None, store_path: Path | None, as_json: bool) -> None:
    """A run's plan, recruitment explanations, every prompt and response, usage and cost."""
    from orchestra.inspect import export_jsonl, run_report, show_run
    from orchestra.view import terminal

    if export and as_json:
        raise click.UsageError("--export jsonl and --json are two formats; give one")
    store = existing_store(store_path)
    if export == "jsonl":
        for line in export_jsonl(store, run_id):
            click.echo(line)
    elif as_json:
        click.echo(json.dumps(run_report(store, run_id), indent=2, ensure_ascii=False))
    else:
        show_run(terminal(), store, run_id)


@main.command()
@click.argument("run_id")
@click.option("--force", is_flag=True, help="Take the run over even if another process seems to hold it.")
@click.option("--reload", is_flag=True, help="A workflow run: read its file as it is now (a template fixed since); "
                                            "calls whose prompts did not change are still replayed.")
@click.option("-i", "--input", "inputs", multiple=True, metavar="KEY=VALUE",
              help="With --reload: a workflow input over the run's own (one the edited file added; repeatable).")
@click.option("--ray", "ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run its in-process models as Ray actors on the cluster at ADDRESS (another cluster than the "
                   "run's, which is gone); default: as the run did.")
@click.option("--in-process", is_flag=True, help="Run its in-process models in this process (a run begun on Ray).")
@click.option("--retry-failed", is_flag=True, help="A done run whose calls failed after their retries: send those "
                                                  "again (and what depends on them), its other answers replayed.")
@budget_options
@store_option
@output_options
def resume(run_id: str, reload: bool, inputs: tuple[str, ...], ray: str | None, in_process: bool,
           retry_failed: bool, **opts: Any) -> None:
    """Finish an interrupted run: recorded calls are replayed, only the rest are sent."""
    from orchestra.workflow import parse_assignments

    if ray is not None and in_process:
        raise click.UsageError("--ray and --in-process both say where the models run; give one")
    if inputs and not reload:  # (the run's steps were written with its recorded inputs)
        raise click.UsageError("-i sets an input of the workflow file read again: add --reload, or leave -i out to "
                               "go on with the run's own inputs")
    given = parse_assignments(list(inputs))
    store = existing_store(opts["store_path"])
    placement = ({"executor": "local"} if in_process else {"executor": "ray", "ray_address": ray or None}
                 if ray is not None else None)
    resume_stored(store, store.run(run_id), opts, reload=reload, inputs=given, placement=placement,
                  retry_failed=retry_failed)


def resume_stored(store: RunStore, record: RunRecord, opts: dict[str, Any], *, reload: bool = False,
                  inputs: dict[str, Any] | None = None, placement: dict[str, Any] | None = None,
                  retry_failed: bool = False) -> NoReturn:
    """Finish a stored run (``orchestra resume``): a finished one's answer is printed from the store,
    unless ``retry_failed`` and calls of it failed (then it runs again, its answers replayed)."""
    from orchestra.core import Orchestra
    from orchestra.view import spent_text

    if record.status == "done" and not reload:  # nothing to send: its answer, without its pool (gone, maybe)
        done = store.result(record.id)
        if done is not None and not (retry_failed and done.usage.failed_calls):
            keep_stdout_for_json(opts["as_json"])
            retry = command("resume", done.run_id, "--retry-failed")
            lost = (f"; {done.usage.failed_calls} of its calls failed after their retries, which `{retry}` sends "
                    "again" if done.usage.failed_calls else "")
            summary = (f"nothing to retry: run {done.run_id} is done and none of its calls failed" if retry_failed
                       else f"nothing to resume: run {done.run_id} is done{lost}")
            finish(done, opts, rich_output=sys.stdout.isatty(), summary=f"{summary} ({spent_text(done)} spent in all)")
    orc = Orchestra.resuming(record.id, store=store, reload=reload, placement=placement)
    budget = settings_from(opts).changes().get("budget")
    execute(orc, lambda run_id: orc.aresume(run_id, budget=budget, force=opts.get("force", False), reload=reload,
                                            inputs=inputs or {}, retry_failed=retry_failed),
            opts, record.id, earlier=store.run_totals(record.id))


def refuse_unused_in_resume(opts: dict[str, Any], *, given: bool) -> None:
    """Refuse what ``run --resume`` of a single run would not use: the run goes on as it began
    (``given``: inputs or a pool were given); its budget may be raised."""
    if opts["no_store"]:
        raise click.UsageError("--resume goes on with a run recorded in the run store; drop --no-store")
    if given:
        raise click.UsageError("--resume goes on with the run's own inputs and pool; leave out -i, --input-file "
                               "and --pool")
    changed = sorted(settings_from(opts).model_fields_set - {"budget"})
    if changed or opts["otel"]:
        what = f"what sets {changed[0]}" if changed else "--otel"
        raise click.UsageError(f"--resume goes on with the run's own settings (a budget aside); leave out {what}")


def resume_latest_run(flow: Workflow, opts: dict[str, Any]) -> NoReturn:
    """Resume the latest unfinished single run of ``flow`` in the store, saying which where several
    are unfinished; with none, one line naming the workflow, the store and its latest finished run."""
    from orchestra.workflow_run import workflow_runs

    store = existing_store(opts["store_path"])
    runs = workflow_runs(store, flow)
    unfinished = [record for record in runs if record.status != "done"]
    if not unfinished:
        which = f"workflow {flow.name!r} ({flow.path.resolve()}) in {store.path}"
        if runs:
            latest_finished = max(runs, key=lambda record: record.updated)
            raise UserError(f"no unfinished run of {which} to resume; its latest finished run is shown with "
                            f"`{command('show', latest_finished.id)}`")
        raise UserError(f"no run of {which} to resume: run it without --resume (a finished run is shown with "
                        "`orchestra show RUN_ID`)")
    latest = unfinished[-1]
    if len(unfinished) > 1 and not opts["quiet"]:
        click.echo(f"note: resuming run {latest.id}, the latest of {len(unfinished)} unfinished runs of workflow "
                   f"{flow.name!r} (`{command('runs')}` lists them; `{command('resume', 'RUN_ID')}` resumes another)",
                   err=True)
    resume_stored(store, latest, opts)


@main.command()
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pool file (default: the embedded local pool).")
@setting_option("k")
@store_options
@budget_options
def chat(pool: Path | None, **opts: Any) -> None:
    """An interactive session: see each plan, edit or re-plan it, then run it."""
    from orchestra.agents import Pool
    from orchestra.chat import ChatSession
    from orchestra.view import terminal

    orc = make_orchestra(Pool.load(pool), opts)
    refuse_unused_recruiting(opts, orc.settings.mode, pool=orc.pool)
    # (piped, its lines are written whole, as ask's are: wrapped at 80 columns, `orchestra resume ID` was split in two)
    ChatSession(orc, console=terminal(soft_wrap=not sys.stdout.isatty()), interactive=sys.stdin.isatty()).loop()
    ignore_ctrl_c()  # (the session said "bye": a SIGINT as the process exited ended it by that signal)


@main.command()
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pool file (default: the embedded local pool).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--api-key-env", metavar="VAR", help="Require 'Authorization: Bearer <key>', the key read from the "
                                                   "environment variable VAR (never logged or stored).")
@click.option("--presets", "presets_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A YAML file of named settings layers, each served as a model (besides the pool's presets:).")
@click.option("--total-max-calls", type=click.IntRange(min=1),
              help="Calls all requests together may make (default: no limit).")
@click.option("--total-max-cost", type=FiniteRange(min=0, min_open=True),
              help="USD all requests together may spend (default: no limit).")
@click.option("--total-max-tokens", type=click.IntRange(min=1),
              help="Tokens all requests together may use (default: no limit).")
@click.option("--max-request-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1024),
              help="The largest request body accepted.")
@click.option("--grace", default=30, show_default=True, type=FiniteRange(min=0, max=86_400),
              help="Seconds runs in flight get to finish on Ctrl-C or SIGTERM; the rest are cancelled (resumable).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let browser pages from ORIGIN (e.g. http://localhost:3000; * for any) call the server; "
                   "repeat for more.")
@choice_options
@settings_options
@request_budget_options
@store_options
def serve(pool: Path | None, host: str, port: int, api_key_env: str | None, presets_file: Path | None,
          total_max_calls: int | None, total_max_cost: float | None, total_max_tokens: int | None,
          max_request_bytes: int, grace: float, cors_origins: tuple[str, ...], **opts: Any) -> None:
    """Serve the orchestra as an OpenAI-compatible model: /v1/chat/completions, /v1/models, /health."""
    import os

    from orchestra.agents import Pool
    from orchestra.budget import Budget

    try:
        from orchestra import serve as serving
    except ImportError as error:
        from orchestra.errors import MissingDependency

        raise MissingDependency(f"orchestra serve needs {error.name}: pip install 'skill-orchestra[serve]'") from None
    serving.check_origins(cors_origins, "--cors-origin")  # (before the pool loads: a typo is told at once)
    api_key = None
    if api_key_env is not None:
        from orchestra.models.http import check_key_env

        try:  # (a key pasted there was repeated in the error: on the terminal, and in any log of it)
            check_key_env(api_key_env or "?")
        except ValueError as error:
            raise ConfigError(f"--api-key-env: {str(error).removeprefix('api_key_env ')}") from None
        api_key = os.environ.get(api_key_env, "").strip()
        if not api_key:  # (an empty key would let any client in with an empty bearer token)
            state = "is not set" if api_key_env not in os.environ else "is empty"
            written = api_key_env.isupper() and api_key_env[0].isalpha()  # (MY_KEY; ghp_..., hex: maybe a key)
            named = (f"--api-key-env {api_key_env}: that environment variable" if written else
                     "--api-key-env: the environment variable it names (not repeated here: it may be a key given by "
                     "mistake)")
            raise ConfigError(f"{named} {state}; set it to the key clients must send")
    limits = (total_max_calls, total_max_cost, total_max_tokens)
    budget = (Budget(max_calls=total_max_calls, max_cost_usd=total_max_cost, max_tokens=total_max_tokens)
              if any(limit is not None for limit in limits) else None)
    loaded = Pool.load(pool)
    ready(loaded)
    application = serving.app(loaded, settings_from(opts), store=store_from(opts["store_path"], opts["no_store"]),
                              presets=serving.read_presets(presets_file) if presets_file else None,
                              api_key=api_key, budget=budget, max_request_bytes=max_request_bytes,
                              cors_origins=cors_origins)
    serving.run(application, host=host, port=port, grace=grace)
