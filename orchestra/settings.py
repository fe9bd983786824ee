"""Settings: every knob of a run in one model, and how layers of them combine.

Layers, lowest first: the defaults here < a pool's ``settings:`` < a workflow's (its ``settings:``,
``budget:`` and ``seed:``) < the command line or the Python call. A layer is a ``Settings`` whose
*explicitly set* fields are the ones it changes (pydantic's ``model_fields_set``, nested models
included), so a workflow's ``recruit: {competence_weight: 0}`` keeps the pool's other recruiting
settings, and a flag that is not given changes nothing. ``matcher`` is replaced whole (its fields
depend on its type). A run records its fully resolved settings (``RunSpec``), and a resume
rebuilds the run from that record alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticSerializationError

from orchestra.budget import Budget, Spent, legacy_budget
from orchestra.errors import ConfigError
from orchestra.matching import MatcherSpec
from orchestra.numbers import REREAD_ADVICE, Amount, Count, decimal_value
from orchestra.plan import Plan
from orchestra.recruit import RecruitConfig
from orchestra.skills import KeywordConfig
from orchestra.vocabulary import AggregatorChoice, ExecutorKind, GraderName, Mode, PlanFallback, Strategy

#: nested settings merged field by field when layered (``matcher`` is replaced whole)
_MERGED = ("recruit", "keywords", "budget")

#: settings of the Orchestra as a whole (its executor), not of one run
ORCHESTRA_LEVEL = ("max_resident_models", "memory_budget_gb", "executor", "ray_address")


#: the most experts a subtask may have: each is a call, and the aggregator reads them all in one
#: prompt (100,000 asked for sent hundreds of calls, then hung on gigabytes of recruiting)
MAX_K = 64


class Settings(BaseModel):
    """Every knob of a run, with its default (each field's ``description`` says what it does;
    the command line's help is built from them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: Count = Field(default=3, ge=1, le=MAX_K, description="Experts per subtask.")
    mode: Mode = Field(default="calibrated", description="How experts are recruited.")
    aggregate: Strategy = Field(default="synthesize", description="How a node's expert answers are combined.")
    aggregator_choice: AggregatorChoice = Field(
        default="best", description="best: one aggregator, the best measured; per-node: the best measured among "
                                    "the agents whose skills fit each node.")
    aggregator: str | None = Field(default=None, description="An agent that aggregates every node.")
    grader: GraderName = Field(default="auto", description="How answers are read, for voting and grading.")
    plan: bool = Field(default=True, description="Plan the task into subtasks (false: run it as one step).")
    max_nodes: Count = Field(default=12, ge=1, description="The largest plan accepted.")
    plan_repairs: Count = Field(default=2, ge=0, description="How often an invalid plan is sent back to the planner.")
    plan_fallback: PlanFallback = Field(default="fail", description="When planning fails: fail, or run the task "
                                                                    "as one step (single).")
    planner_max_tokens: Count = Field(default=1024, ge=16, description="The planner's answer limit.")
    fast_path: bool = Field(default=True, description="Run a short, single-sentence task as one step without "
                                                      "asking the planner.")
    plan_check: bool = Field(default=True, description="Run the task as one step when the planner's steps are "
                                                       "not about it.")
    context_chars: Count = Field(default=4000, ge=1, description="The most characters of a dependency's output "
                                                                 "a node sees.")
    max_response_chars: Count = Field(default=100_000, ge=1, description="The most characters of an expert's "
                                                                         "answer passed on to aggregation.")
    max_resident_models: Count | None = Field(
        default=None, ge=1, description="In-process models kept loaded at once (not set: 1, or with memory_budget_gb "
                                        "as many as fit it).")
    memory_budget_gb: Amount | None = Field(default=None, gt=0, description="Keep loaded in-process models within "
                                                                           "this many GiB (alone: as many as fit).")
    executor: ExecutorKind = Field(default="local", description="Where in-process models run: in this process, "
                                                                "or as Ray actors (ray), several at once.")
    ray_address: str | None = Field(default=None, description="The Ray cluster for executor: ray (auto, HOST:PORT); "
                                                              "none: RAY_ADDRESS, a running one or a new local one.")
    recruit: RecruitConfig = Field(default=RecruitConfig(), description="Recruiting beyond mode and k.")
    keywords: KeywordConfig = Field(default=KeywordConfig(), description="Skill extraction.")
    matcher: MatcherSpec = Field(default=MatcherSpec(), description="How keywords map onto profile skills.")
    budget: Budget = Field(default=Budget(), description="Per-run limits (on by default).")
    cache: bool = Field(default=False, description="Reuse stored answers to identical requests.")
    seed: Count = Field(default=0, description="Seed for every sampling choice; same seed, same recruitments.")

    @classmethod
    def layer(cls, values: Settings | Mapping[str, Any] | None, *, where: str = "setting") -> Settings:
        """``values`` as a layer (a mapping is validated; an error names the setting to fix)."""
        if values is None:
            return cls()
        if isinstance(values, Settings):
            return values
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(f"{where} {_first_problem(error, dotted=where == '--set')}") from None

    def changes(self) -> dict[str, Any]:
        """The explicitly set values of this layer (nested ones too)."""
        return self.model_dump(exclude_unset=True)

    def layered(self, *overs: Settings | Mapping[str, Any] | None) -> Settings:
        """These settings with each of ``overs`` on top, in order; the result's set fields are
        the union, so it can be layered again."""
        merged = self.changes()
        for over in overs:
            if over is None:
                continue
            for name, value in Settings.layer(over).changes().items():
                if name in _MERGED and isinstance(merged.get(name), dict):
                    merged[name] = {**merged[name], **value}
                else:
                    merged[name] = value
        return Settings.model_validate(merged)

    def assigned(self, pairs: Sequence[str]) -> Settings:
        """These settings with ``KEY=VALUE`` assignments (``--set``) on top; a dotted key sets one
        field of a nested setting (``keywords.samples=3``). Values are read as YAML scalars."""
        return self.layered(Settings.layer(assignments(pairs), where="--set"))


def assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """``["keywords.samples=3", ...]`` as nested data; a pair without ``=`` is an error naming it."""
    import yaml  # only here: the command line starts without it

    data: dict[str, Any] = {}
    given: list[str] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key = key.strip()
        earlier = next((k for k in given if k == key or key.startswith(k + ".") or k.startswith(key + ".")), None)
        if earlier is not None:  # which should win? neither silently
            raise ConfigError(f"--set {key} is given twice; give it once" if earlier == key else
                              f"--set {earlier} and --set {key} both set {max(earlier, key, key=len)}; give it once")
        given.append(key)
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            node[part] = child = child if isinstance(child, dict) else {}
            node = child
        try:
            node[leaf] = value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[leaf] = raw
        except RecursionError:
            raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to read") from None
        else:
            reread = _reread_integer(raw, yaml) if value is not None else None  # (max_calls=010 was 8, not 10)
            if reread is not None:
                raise ConfigError(f"--set {key}: YAML reads {reread[0]} as {reread[1]}: {REREAD_ADVICE}")
    return data


def _reread_integer(raw: str, yaml: Any) -> tuple[str, int] | None:
    """The first unquoted whole number in ``raw`` (a ``--set`` value, a mapping or list too) that YAML
    1.1 reads otherwise than its digits say, as written and as read; None if there is none."""
    try:
        nodes = [yaml.compose(raw, Loader=yaml.SafeLoader)]
    except (yaml.YAMLError, RecursionError):
        return None
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            nodes.extend(part for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
        elif node is not None and node.tag == "tag:yaml.org,2002:int" and node.style is None:
            value = yaml.safe_load(node.value)
            if decimal_value(node.value) != value:
                return node.value, value
    return None


def _first_problem(error: ValidationError, *, dotted: bool = False, model: type[BaseModel] | None = None) -> str:
    """``key.path: what is wrong`` for the first problem pydantic found (``dotted``: a nested setting
    is written ``group.name``, as ``--set`` takes it, rather than as a mapping; ``model``: the one
    validated, ``Settings`` unless given)."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        path = [str(part) for part in first["loc"]]
        if model is not None:  # (answer options: no group of settings holds them)
            return f"{where}: no such option; {_nearest(path[-1], list(model.model_fields))}"
        # (--set competence_weight=1 said only "no such setting"; recruit.max_tokens=5 "did you mean 'max_cost_...'")
        nested = nested_hint(path[-1], "{group}.{name}" if dotted else "{group}: {{{name}: ...}}")
        if len(path) > 1 and path[-1] in Settings.model_fields:  # (recruit.k suggested 'k_max', 'p', 'cost_lambda')
            nested = f"{path[-1]} is a setting of its own, not of {'.'.join(path[:-1])}: " + (
                f"{path[-1]}=..." if dotted else f"{path[-1]}: ... at the top")
        elif nested and path[-1] == "temperature":  # (read as the experts' sampling, which is an agent's)
            nested += " (the experts' sampling temperature is each agent's: temperature: in the pool file)"
        near = None if nested else _near_setting(path)  # (a budget's max_tokens: "did you mean planner_max_tokens")
        return f"{where}: no such setting; {nested or near}" if nested or near else f"{where}: no such setting"
    if first["type"] == "literal_error":
        return f"{where}: unknown value {first['input']!r}; choose one of {first['ctx']['expected']}"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


#: the settings that group others (``recruit``, ``budget``...), and the names of theirs
SETTING_GROUPS = {name: frozenset(spec.annotation.model_fields) for name, spec in Settings.model_fields.items()
                  if isinstance(spec.annotation, type) and issubclass(spec.annotation, BaseModel)}


def nested_hint(name: str, form: str) -> str | None:
    """Where a setting given at the top belongs, each group that has one of that name written in
    ``form`` (``{group}``, ``{name}``): ``it is a keywords or budget setting: ...``; None if none has."""
    groups = [group for group, names in SETTING_GROUPS.items() if name in names]
    if not groups:
        return None
    return (f"it is a {' or '.join(groups)} setting: "
            + " or ".join(form.format(group=group, name=name) for group in groups))


def _near_setting(path: list[str]) -> str | None:
    """What to say of ``path``'s last name: the setting beside it that it most likely misspells
    (``did you mean 'k'?``), else the closest ones and where every one is described; None where
    ``path`` is not under a group of settings."""
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        field = model.model_fields.get(part)
        inner = next((kind for kind in (field.annotation, *get_args(field.annotation)) if isinstance(kind, type)
                      and issubclass(kind, BaseModel)), None) if field is not None else None
        if inner is None:
            return None
        model = inner
    # (--set nonsense=1 said only "no such setting": no name to try, nor where the names are)
    import orchestra

    where = "orchestra" if model.__name__ in orchestra.__all__ else model.__module__
    group = " ".join(path[:-1])
    return _nearest(path[-1], list(model.model_fields),
                    f"every {group + ' ' if group else ''}setting: the README's Settings table, or "
                    f"{where}.{model.__name__} in Python")


def _nearest(name: str, names: list[str], where: str = "") -> str:
    """``did you mean 'k'?`` where ``name`` most likely misspells one of ``names``, else the three
    closest of them (and ``where`` they are all described)."""
    import difflib

    same = [known for known in names if known.lower() == name.lower()]  # ("K": k; difflib weighs case)
    near = same or difflib.get_close_matches(name, names, n=1)
    if near:
        return f"did you mean {near[0]!r}?"
    ranked = sorted(names, key=lambda known: -difflib.SequenceMatcher(None, name.lower(), known.lower()).ratio())
    return f"the closest are {', '.join(map(repr, ranked[:3]))}" + (f" ({where})" if where else "")


class WorkflowRef(BaseModel):
    """The workflow a run came from, its inputs and its text: a resume renders the steps' prompts
    again from the workflow as it was when the run began, even if the file was edited since."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    inputs: dict[str, Any] = {}
    defaulted: list[str] = []
    """The inputs that took the workflow's default (a resume that reads the file again takes its defaults now)."""
    source: str | None = None
    """The workflow file's text when the run began (None in records made before it was kept: the file is read)."""
    titled: bool = True
    """Whether the run's task says what the workflow is for (its ``task:`` or ``description:``); a task that is
    only the workflow's name is not shown to its steps' experts as their overall task ("Overall task: two-step")."""


class AnswerOptions(BaseModel):
    """How the run's answer is written (``orchestra serve`` sets these from a chat request): they
    apply to the calls that write the answer, the final node's experts and aggregator, or the
    final synthesis of several sinks.

    Attributes:
        output: "text", "json" (any JSON value) or a JSON schema the answer must follow.
        max_tokens: the answer-writing calls' token limit (None: each agent's own).
        temperature: their sampling temperature (None: each agent's own).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str | dict[str, Any] = "text"
    max_tokens: Count | None = Field(default=None, ge=1)
    temperature: Amount | None = Field(default=None, ge=0, le=2)

    @classmethod
    def given(cls, value: Any) -> AnswerOptions:
        """A run's ``answer=`` argument as options: themselves, their fields as a dict, or None (the
        defaults); anything else, or a field that does not hold, is a one-line ``ConfigError`` (it
        was pydantic's error about ``RunSpec``, a class the caller never named)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"answer must be AnswerOptions or its fields as a dict ({{'output': 'json'}}), not "
                              f"{type(value).__name__} {value!r:.40}")
        try:
            return cls.model_validate(value)
        except ValidationError as error:
            raise ConfigError(f"answer.{_first_problem(error, model=cls)}") from None

    @field_validator("output", mode="before")
    @classmethod
    def _not_a_class(cls, value: Any) -> Any:
        from orchestra.models.structured import class_in_place_of_schema

        hint = class_in_place_of_schema(value)
        if hint:
            raise ValueError(hint)
        return value

    @field_validator("output")
    @classmethod
    def _usable_output(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, str):
            if value not in ("text", "json"):
                raise ValueError(f"must be 'text', 'json' or a JSON schema, not {value!r}")
            return value
        if not value:  # an empty schema allows any JSON value
            return "json"
        from orchestra.models.structured import schema_problem

        problem = schema_problem(value)
        if problem:
            raise ValueError(f"the schema is not usable: {problem}")
        return value


class RunSpec(BaseModel):
    """Everything a run was asked to do, recorded with it: a resume rebuilds the run from this alone.

    Attributes:
        task: the task text.
        settings: the fully resolved settings.
        plan: a plan given to run as is (None: the planner's, or one step).
        pinned: experts fixed per node (by a batch's rare-expert filter), kept on resume.
        answer_format: how the final answer should be stated (for grading).
        context: conversation context the planner and experts see (chat).
        pool: the pool file (None: a pool built in Python).
        workflow: the workflow file and inputs, for a workflow's run.
        meta: JSON-ready facts shown in listings (``kind``, ``method``, ``dataset``, ``item``...).
        answer: how the answer is written (format, token limit, temperature).
        nodes: per-node settings given in Python (``NodeSettings`` without its ``prompt``), by node id;
            a workflow's run rebuilds its own from the workflow instead.
        unrecorded: what a run was given in Python that its record cannot hold (``final``, a node's
            ``prompt``): a resume needs them given again.
        spent_before: what its task spent before the run began (chat's planning): it counts against
            the run's limits, on resume too, and is no part of the run's usage.
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    settings: Settings
    plan: Plan | None = None
    pinned: dict[str, list[str]] = {}
    answer_format: str | None = None
    context: str = ""
    pool: str | None = None
    workflow: WorkflowRef | None = None
    meta: dict[str, Any] = {}
    answer: AnswerOptions = AnswerOptions()
    nodes: dict[str, dict[str, Any]] = {}
    unrecorded: list[str] = []
    spent_before: Spent | None = None

    def record_json(self) -> str:
        """What the store keeps of the run (``{"spec": ...}``, the spec's JSON; twice per run of a data set). The
        settings, frozen and shared by a data set's runs, are written once per settings object."""
        try:
            rest = type(self).__pydantic_serializer__.to_json(self, exclude=_SETTINGS_FIELD).decode()
        except PydanticSerializationError as error:
            if "surrogates not allowed" not in str(error):
                raise
            raise ConfigError("the run holds text that is not valid Unicode (a lone surrogate, from JSON's "
                              "\\ud800 escape or bytes that are not UTF-8) in its inputs, plan or meta; send UTF-8 "
                              "text") from None
        return f'{{"spec": {{"settings": {_settings_json(self.settings)}, {rest[1:]}}}'

    @classmethod
    def from_record(cls, config: Mapping[str, Any], task: str) -> RunSpec:
        """The spec a run recorded; a record written before specs existed is converted (a budget
        recorded before ``cap_answers`` was gets it as its run had it)."""
        if "spec" in config:
            spec = config["spec"]
            settings = spec.get("settings") if isinstance(spec, Mapping) else None
            if isinstance(settings, Mapping) and isinstance(settings.get("budget"), Mapping):
                spec = {**spec, "settings": {**settings, "budget": legacy_budget(settings["budget"])}}
            return cls.model_validate(spec)
        return _from_legacy(config, task)


_SETTINGS_FIELD = {"settings"}
#: settings as JSON, by the object's identity: the object itself (so its id is not reused) and its JSON
_settings_texts: dict[int, tuple[Settings, str]] = {}


def _settings_json(settings: Settings) -> str:
    """A settings object's JSON (frozen all the way down, so it is written once per object)."""
    known = _settings_texts.get(id(settings))
    if known is not None and known[0] is settings:
        return known[1]
    text = Settings.__pydantic_serializer__.to_json(settings).decode()
    if len(_settings_texts) >= 64:
        _settings_texts.clear()
    _settings_texts[id(settings)] = (settings, text)
    return text


def _from_legacy(config: Mapping[str, Any], task: str) -> RunSpec:
    """A run recorded by version 0.1 (``options`` + ``orchestra`` settings) as a spec."""
    options = dict(config.get("options") or {})
    stored = dict(config.get("orchestra") or {})
    settings = {k: v for k, v in options.items() if k in Settings.model_fields}
    if isinstance(settings.get("budget"), Mapping):
        settings["budget"] = legacy_budget(settings["budget"])
    recruit = {k: v for k, v in (stored.get("recruit") or {}).items() if k in RecruitConfig.model_fields}
    settings.update(recruit=recruit, keywords=stored.get("keywords") or {},
                    **{k: stored[k] for k in ("aggregator", "grader", "cache", "max_resident_models",
                                              "memory_budget_gb", "matcher") if stored.get(k) is not None})
    meta = dict(config.get("meta") or {})
    workflow = (WorkflowRef(path=meta.pop("workflow"), inputs=meta.pop("inputs", None) or {})
                if meta.get("kind") == "workflow" and meta.get("workflow") else None)
    return RunSpec(task=task, settings=Settings.model_validate(settings),
                   plan=Plan.model_validate(config["plan"]) if config.get("plan") else None,
                   pinned=config.get("fixed_experts") or {}, answer_format=options.get("answer_format"),
                   context=options.get("context") or "", pool=config.get("pool") or meta.get("pool"),
                   workflow=workflow, meta=meta)
