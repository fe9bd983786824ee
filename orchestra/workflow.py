"""YAML workflows: a pool, typed inputs, and either ``plan: auto`` or explicit steps.

Everything is checked when the file is loaded (``orchestra validate``): the schema, the pool,
agent names, ``needs`` and cycles, and every template's references to ``inputs.*`` and
``steps.<id>.*``. Each problem is one line naming the file, line and column.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.meta import find_undeclared_variables
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestra.agents import Pool
from orchestra.budget import Budget
from orchestra.dag import Dag
from orchestra.errors import ConfigError
from orchestra.matching import LexicalMatcher
from orchestra.numbers import Count
from orchestra.pipeline.scheduler import NodeSettings, Outputs
from orchestra.plan import ID_PATTERN, MAX_SKILLS, Plan, Subtask
from orchestra.prompts import MAX_TASK_CHARS, MAX_TEMPLATE_OUTPUT, RENDER_FAILED, environment, render_string
from orchestra.settings import MAX_K, Settings
from orchestra.skills import skill_names
from orchestra.vocabulary import GraderName, Mode, Strategy
from orchestra.yamlfile import YamlDocument, read_yaml

#: the settings only a planner reads (a workflow with steps has none)
_PLANNING = ("max_nodes", "plan_repairs", "plan_fallback", "planner_max_tokens", "fast_path", "plan_check")

_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "number": (int, float),
                                              "boolean": bool}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """A declared input."""

    type: Literal["string", "integer", "number", "boolean"] = "string"
    required: bool = False
    default: Any = None
    description: str = ""


class RecruitSpec(_Strict):
    """How a step recruits its experts."""

    k: Count | None = Field(default=None, ge=1, le=MAX_K)
    skills: list[str] = Field(default=[], max_length=MAX_SKILLS)
    mode: Mode | None = None

    @field_validator("skills")
    @classmethod
    def _plain_words(cls, skills: list[str]) -> list[str]:
        for skill in skills:
            if not skill_names([skill], 40):
                raise ValueError(f"skill {skill!r} is not a plain word or phrase (letters, digits, spaces and "
                                 "+ # & ' . / -, at most 40 characters)")
        return skills


class StepSpec(_Strict):
    """One explicit step."""

    id: str = Field(pattern=ID_PATTERN)
    prompt: str = Field(min_length=1)
    needs: list[str] = []
    description: str = ""
    recruit: RecruitSpec | None = None
    agent: str | None = None
    aggregate: Strategy | None = None
    output: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _says_something(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("is blank; write what the step should do")
        return prompt

    @field_validator("output")
    @classmethod
    def _usable_schema(cls, output: dict[str, Any] | None) -> dict[str, Any] | None:
        from orchestra.models.structured import schema_problem

        problem = schema_problem(output) if output else None
        if problem:  # (a run would send it, then blame the model for answers it cannot check)
            raise ValueError(f"the schema is not usable: {problem}")
        return output

    @model_validator(mode="after")
    def _one_way_to_pick_experts(self) -> StepSpec:
        if self.recruit is not None and self.agent is not None:
            raise ValueError("a step sets either recruit or agent, not both")
        if self.aggregate is not None and self.agent is not None:  # (accepted, it did nothing)
            raise ValueError("a step with agent: has that one expert, so there is nothing to aggregate; "
                             "drop aggregate, or recruit several experts instead of naming one")
        if self.recruit is not None and self.recruit.k == 1 and self.aggregate in ("synthesize", "refine"):
            raise ValueError(f"a step that recruits one expert (k: 1) has nothing to {self.aggregate}; drop "
                             "aggregate, or recruit more experts")  # (its one answer was the output all the same)
        return self


class DatasetSpec(_Strict):
    """Run the workflow once per item of a labelled data set and grade the final answers."""

    path: str
    grader: GraderName | None = None
    """How answers are graded (default: the run settings' ``grader``, as votes read them)."""
    limit: Count | None = Field(default=None, ge=1)


class WorkflowFile(_Strict):
    """The schema of a workflow file."""

    name: str | None = None
    description: str = ""
    pool: str | dict[str, Any] | None = None
    inputs: dict[str, InputSpec] = {}
    plan: Literal["auto"] | None = None
    task: str | None = None
    steps: list[StepSpec] = []
    final: str | None = None
    budget: Budget | None = None
    settings: Settings = Settings()
    seed: Count = 0
    dataset: DatasetSpec | None = None

    @field_validator("final")
    @classmethod
    def _renders_something(cls, final: str | None) -> str | None:
        if final is not None and not final.strip():  # (the run ended done with a blank answer)
            raise ValueError("is blank; write the template of the answer (steps.ID.output...), or leave final out")
        return final

    @field_validator("pool", mode="before")
    @classmethod
    def _pool_file_or_pool(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, dict)):  # (pydantic named its union's branches)
            raise ValueError(f"give a pool file's path, or the pool itself (models:, agents:), not {value!r:.40}")
        return value

    @model_validator(mode="after")
    def _set_once(self) -> WorkflowFile:
        twice = ["seed"] if "seed" in self.model_fields_set and "seed" in self.settings.model_fields_set else []
        if self.budget is not None and "budget" in self.settings.model_fields_set:
            twice += [f"budget.{name}" for name in Budget.model_fields
                      if name in self.budget.model_fields_set & self.settings.budget.model_fields_set]
        if twice:  # (which should win?) placed at the first one under settings:
            raise PydanticCustomError("set_twice",
                                      "{names} {verb} set both at the top and under settings: give each once", {
                                          "names": ", ".join(twice), "verb": "is" if len(twice) == 1 else "are",
                                          "at": ("settings", *twice[0].split("."))})
        return self

    @model_validator(mode="after")
    def _plan_or_steps(self) -> WorkflowFile:
        if self.plan == "auto" and self.steps:
            raise ValueError("use either plan: auto (with task) or steps, not both")
        if self.plan == "auto" and not self.task:
            raise ValueError("plan: auto needs a task template")
        if self.plan is None and not self.steps:
            raise ValueError("a workflow needs steps, or plan: auto with a task")
        return self


class _Ancestors:
    """The steps one step may read (those it needs, directly or not), worked out only when a
    template reads a step it does not need directly (each step's at once made validation quadratic)."""

    def __init__(self, graph: Dag, step: str) -> None:
        self.graph, self.step = graph, step
        self._all: set[str] | None = None

    def __contains__(self, name: object) -> bool:
        if name in self.graph.dependencies[self.step]:
            return True
        if self._all is None:
            self._all = self.graph.ancestors(self.step)
        return name in self._all


class Workflow:
    """A validated workflow, ready to run with given inputs."""

    def __init__(self, spec: WorkflowFile, document: YamlDocument, pool: Pool, path: Path) -> None:
        self.spec = spec
        self.document = document
        self.pool = pool
        self.path = path

    @functools.cached_property
    def _step_outputs(self) -> dict[str, Any]:
        """Each step's ``output:`` schema (None for text), by step id."""
        return {step.id: step.output for step in self.spec.steps}

    @property
    def name(self) -> str:
        """The workflow's name (its file stem when unnamed)."""
        return self.spec.name or self.path.stem

    def settings(self) -> Settings:
        """The pool's settings with the workflow's on top: its ``settings:``, ``budget:`` and ``seed:``."""
        own: dict[str, Any] = {name: getattr(self.spec, name) for name in ("budget", "seed")
               if name in self.spec.model_fields_set and getattr(self.spec, name) is not None}
        return self.pool.settings.layered(self.spec.settings, own)

    def unused_setting(self, names: Iterable[str]) -> tuple[str, str] | None:
        """The first of ``names`` (settings given for this workflow: its own, the command line's) that
        would do nothing in it, and why; None when each applies."""
        for name in (name for name in Settings.model_fields if name in names):
            if name == "plan":
                return name, "whether a workflow is planned is its plan: auto, or its steps"
            if name == "context_chars" and self.spec.plan != "auto":
                return name, ("a step's prompt shows the outputs its template writes, whole (it cuts what a planned "
                              "step is shown)")
            if name in _PLANNING and self.spec.plan != "auto":
                return name, "it is the planner's, and this workflow's steps are written out, not planned"
        return None

    @classmethod
    def load(cls, path: str | Path, *, pool: Pool | None = None, text: str | None = None,
             data: bool | None = None) -> Workflow:
        """Read and fully validate a workflow file; ``pool`` replaces the file's own pool; ``text``:
        the file's text as it was (a run's record), read instead of the file; ``data``: whether its
        data set must be there (default: unless ``text`` is given; a recorded run holds its item's inputs)."""
        if pool is not None and not isinstance(pool, Pool):  # (a path was an AttributeError)
            raise ConfigError(f"pool must be a Pool, not {type(pool).__name__}: Pool.load({pool!r:.60}) reads a "
                              "pool file")
        file = Path(path)
        document = read_yaml(file, text)
        document.check_numbers = text is None  # (a run's recorded text may hold what is refused since)
        if not isinstance(document.data, dict):
            raise document.error("a workflow file must be a mapping")
        if {"models", "agents"} <= document.data.keys() and not {"steps", "task", "pool"} & document.data.keys():
            raise document.error(f"{file.name} is a pool file (it has models: and agents:), not a workflow: give it "
                                 f"with --pool (orchestra ask \"...\" --pool {file}), or run a workflow file")
        spec = document.validate(WorkflowFile, checked_apart=_input_default)  # (said with what -i reads)
        workflow = cls(spec, document, pool or _load_pool(spec, document, file), file)
        workflow._check(data=text is None if data is None else data, recorded=text is not None)
        if pool is None and text is None:  # (on another pool, the skills written for its own may all be missing)
            workflow._check_skills()
        return workflow

    # --- validation ------------------------------------------------------------------------

    def _check(self, *, data: bool = True, recorded: bool = False) -> None:
        """Refuse what a run would fail on, or not use; ``recorded``: the text is a run's record, which
        may set what is refused since (such a run still resumes)."""
        spec, document = self.spec, self.document
        for name, declared in spec.inputs.items():
            if not recorded and (not name.strip() or "=" in name or name != name.strip()):  # (-i could not give it)
                raise document.key_error(f"input {name!r}: an input's name is given as -i NAME=VALUE, so it is not "
                                         "blank, has no '=' and no spaces at its ends: rename it", ("inputs", name))
            default, kind = declared.default, declared.type
            written = document.written(("inputs", name, "default"))
            if default is not None and not _is_type(default, kind):
                number = _typed(default, kind) if kind in ("integer", "number") else None
                quote = (" (YAML reads the unquoted words on, off, yes, no, true and false as booleans: quote it, "
                         f"\"{written}\")" if isinstance(default, bool) else
                         f" (YAML read the unquoted value as {_YAML_KINDS.get(type(default).__name__, 'another type')}"
                         ": quote it to keep it as written)" if kind == "string" else
                         f" (YAML reads {default} as text, not a number: write {number!r})" if number is not None
                         else "")
                raise document.error(f"input {name!r}: default {default!r} is not of type {kind}{quote}",
                                     ("inputs", name, "default"))
            if isinstance(default, str) and len(default) > MAX_TEMPLATE_OUTPUT:  # (refused as its prompt rendered)
                raise document.error(f"input {name!r}: its default is {len(default):,} characters; a prompt holds "
                                     f"at most {MAX_TEMPLATE_OUTPUT:,} in all: shorten it",
                                     ("inputs", name, "default"))
            if isinstance(default, float) and not math.isfinite(default):  # (.nan, .inf in YAML)
                raise document.error(f"input {name!r}: default {default} is not a finite number (a given value "
                                     "would be refused so)", ("inputs", name, "default"))
            given = _typed(written, kind) if written is not None and kind in ("integer", "number") else default
            if given != default:  # 010 (octal), 12:30 (base 60), 0x1f: not what `-i name=...` reads
                raise document.error(f"input {name!r}: YAML reads the default {written} as {default!r}" + (
                    f", and -i {name}={written} as {given!r}" if given is not None else "") + ": write the number "
                    "meant in decimal digits", ("inputs", name, "default"))
        if spec.dataset is not None:
            if "question" not in spec.inputs:
                raise document.error("a workflow with a dataset must declare the input 'question' (each item's "
                                     "question goes there)", ("dataset",))
            if spec.inputs["question"].type != "string":  # (every item would fail at its run)
                raise document.error("the input 'question' of a workflow with a dataset is each item's question, "
                                     "which is text: declare it as type string", ("inputs", "question", "type"))
            where = self.path.parent / spec.dataset.path
            if data and where.is_dir():
                raise document.error(f"the data set {where} is a folder; name its JSONL file", ("dataset", "path"))
            if data and not where.is_file():
                raise document.error(f"data set not found: {where}", ("dataset", "path"))
        unused = None if recorded else self.unused_setting(spec.settings.model_fields_set)
        if unused is not None:  # (accepted, then not used)
            raise document.error(f"settings.{unused[0]} does nothing here: {unused[1]}; leave it out",
                                 ("settings", unused[0]))
        aggregator = spec.settings.aggregator
        if aggregator is not None and aggregator not in self.pool:  # (the run would stop at its start)
            raise document.error(f"aggregator {aggregator!r} is not an agent of pool {self.pool.name!r}; the pool has "
                                 f"{', '.join(self.pool.names)}", ("settings", "aggregator"))
        if spec.task is not None:  # rendered before any step runs
            self._check_template(spec.task, ("task",), steps_allowed=set())
        if spec.plan == "auto":
            if spec.final is not None:  # its inputs and syntax (the steps are named when planned)
                self._check_template(spec.final, ("final",), steps_allowed=set(), planned=True)
            return
        ids = [step.id for step in spec.steps]
        seen: set[str] = set()
        for index, step in enumerate(spec.steps):
            if step.id in seen:
                raise document.error(f"duplicate step id {step.id!r}", ("steps", index, "id"))
            seen.add(step.id)
        for index, step in enumerate(spec.steps):
            for position, need in enumerate(step.needs):
                if need not in seen:
                    raise document.error(f"step {step.id!r} needs unknown step {need!r}; steps: {', '.join(ids)}",
                                         ("steps", index, "needs", position))
                if need in step.needs[:position]:
                    raise document.error(f"step {step.id!r} needs {need!r} twice; list it once",
                                         ("steps", index, "needs", position))
            if step.agent is not None and step.agent not in self.pool:
                raise document.error(f"step {step.id!r} names unknown agent {step.agent!r}; "
                                     f"the pool has {', '.join(self.pool.names)}", ("steps", index, "agent"))
        graph = Dag({step.id: step.needs for step in spec.steps})
        cycle = graph.cycle()
        if cycle is not None:
            first = ids.index(cycle[1])  # the step whose needs close it
            raise document.error(f"the steps' needs form a cycle: {' -> '.join(cycle)}", ("steps", first, "needs"))
        for index, step in enumerate(spec.steps):
            self._check_template(step.prompt, ("steps", index, "prompt"), steps_allowed=_Ancestors(graph, step.id),
                                 step_id=step.id)
        if spec.final is not None:
            self._check_template(spec.final, ("final",), steps_allowed=set(ids))

    def _check_skills(self) -> None:
        """Refuse a step's skills when none matches a skill of the workflow's own pool (the step was
        recruited as if it named none, and nothing said so; one that matches is enough, as a workflow
        may be written for several pools); an embedding matcher's matches are known only when it is asked."""
        settings = self.settings()
        matcher = settings.matcher.build() if any(step.recruit and step.recruit.skills for step in self.spec.steps) \
            else None
        if not isinstance(matcher, LexicalMatcher):
            return
        vocabulary = self.pool.skill_table(settings.recruit).vocabulary
        if not vocabulary:  # (no agent has a skill: recruiting reads none)
            return
        for index, step in enumerate(self.spec.steps):
            skills = step.recruit.skills if step.recruit else []
            if skills and all(matcher.nearest(name, vocabulary) is None for name in skill_names(skills, 40)):
                shown = ", ".join(vocabulary[:10]) + (", ..." if len(vocabulary) > 10 else "")
                raise self.document.error(
                    f"step {step.id!r}: its skills ({', '.join(skills)}) match none of the pool's {len(vocabulary)} "
                    f"skills ({shown}); fix them, or leave skills out to have them found from its prompt",
                    ("steps", index, "recruit", "skills"))

    def _check_template(self, source: str, loc: tuple[Any, ...], *, steps_allowed: Container[str],
                        step_id: str | None = None, planned: bool = False) -> None:
        """Refuse what would fail when ``source`` renders: bad syntax, unknown names, steps it may not
        read (``planned``: the steps are named by the planner at run time, so any may be read)."""
        try:
            self._check_template_text(source, loc, steps_allowed=steps_allowed, step_id=step_id, planned=planned)
        except RecursionError:  # (Jinja's parser recurses per level: a traceback where 100 brackets nested)
            raise self.document.error(f"{f'step {step_id!r}' if step_id else loc[0]}: its template nests expressions "
                                      "or blocks too deeply for Jinja to read; flatten it",
                                      loc) from None

    def _check_template_text(self, source: str, loc: tuple[Any, ...], *, steps_allowed: Container[str],
                             step_id: str | None, planned: bool) -> None:
        document = self.document
        jinja = environment()
        try:
            tree = jinja.parse(source)
            unknown = find_undeclared_variables(tree) - {"inputs", "steps"}  # (compiles it: an unknown filter)
        except TemplateSyntaxError as error:
            raise document.text_error(f"template syntax error: {error.message}", loc, error.lineno) from None
        if unknown:
            dashed = _DASHED_NAME.search(source)
            if dashed is not None:  # ("steps.a-b.output" is steps.a minus b.output: "unknown variable 'b'")
                kind, name, rest = dashed[1], dashed[2], dashed[3] or ""
                raise document.error(f"{kind}.{name} reads as {kind}.{name.split('-')[0]} minus "
                                     f"{name.split('-', 1)[1]}: write {kind}[\"{name}\"]{rest}", loc)
            raise document.error(f"unknown template variable {sorted(unknown)[0]!r}; use inputs.<name> or "
                                 "steps.<id>.output", loc)
        owner = f"step {step_id!r}" if step_id else loc[0]
        tree = _unaliased(tree)  # ({% set s = steps.a %}{{ s.outptu }} was checked as nothing)
        written = sum(len(data.data) for data in tree.find_all(nodes.TemplateData))
        limit, what = ((MAX_TASK_CHARS, "a task is") if loc == ("task",)
                       else (MAX_TEMPLATE_OUTPUT, "a template may write"))
        if written > limit:  # (the run would refuse it at that step, after the steps before)
            raise document.error(f"{owner}: its template has {written:,} characters of its own text; {what} at most "
                                 f"{limit:,}: shorten it", loc)
        for test in tree.find_all(nodes.Test):  # (Jinja finds an unknown test only when it runs)
            if test.name not in jinja.tests:
                named = ", ".join(sorted(filter(str.isidentifier, jinja.tests)))
                raise document.text_error(f"{owner} uses the unknown template test {test.name!r} (`is "
                                          f"{test.name}`); tests: {named}", loc, test.lineno)
        schemas = self._step_outputs  # (each step's output: schema, by id; its keys are the step ids)
        keyed = {"inputs": self.spec.inputs.keys(), "steps": schemas.keys()}
        for call in tree.find_all(nodes.Call):  # a key is read before the dict's method of its name
            method = call.node
            if isinstance(method, nodes.Getattr) and isinstance(method.node, nodes.Name) \
                    and method.attr in keyed.get(method.node.name, ()):
                base, kind = method.node.name, method.node.name[:-1]
                raise document.text_error(f"{owner} calls {base}.{method.attr}(), but {base}.{method.attr} is the "
                                          f"{kind} named {method.attr!r}; rename the {kind}", loc, call.lineno)
        for name, kind, line in _references(tree):
            if kind == "inputs" and name not in self.spec.inputs:
                raise document.text_error(f"{owner} uses undeclared input {name!r}; declare it under inputs:",
                                          loc, line)
            if kind == "steps" and loc == ("task",):
                raise document.text_error(f"task uses steps.{name}, but the task is written before any step "
                                          "runs; use inputs there", loc, line)
            if kind == "steps" and not planned:
                if name not in schemas:
                    raise document.text_error(f"{owner} references unknown step {name!r}", loc, line)
                if name == step_id:  # (needing itself would be a cycle)
                    raise document.text_error(f"{owner} uses its own output (steps.{name}); a step can read only "
                                              "the steps it needs, which run before it", loc, line)
                if name not in steps_allowed:
                    raise document.text_error(f"{owner} uses steps.{name} but does not need {name!r}; "
                                              f"add it to needs", loc, line)
        for step, part, line in _step_parts(tree):
            if part not in ("output", "data"):
                raise document.text_error(f"{owner} uses steps.{step}.{part}; a step has output (its text) and "
                                          "data (its JSON, with an output: schema)", loc, line)
            if part == "data" and planned:
                raise document.text_error(f"{owner} uses steps.{step}.data, but planned steps have no output: "
                                          f"schema (data is the JSON one asks for); use steps.{step}.output", loc, line)
            if part == "data" and step in schemas and schemas[step] is None:
                raise document.text_error(f"{owner} uses steps.{step}.data, but step {step!r} has no output: "
                                          f"schema (data is the JSON it asks for); use steps.{step}.output", loc, line)
        for step, path, line in _data_paths(tree):  # (a misspelt field paid every step, then failed to render)
            problem = _path_problem(schemas.get(step) if not planned else None, path)
            if problem:
                shown = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
                raise document.text_error(f"{owner} uses steps.{step}.data{shown}, but step {step!r}'s output: "
                                          f"schema {problem}", loc, line)
        for step, part, line in _text_parts(tree):
            raise document.text_error(f"{owner} uses steps.{step}.output.{part}, but a step's output is its text, "
                                      f"which has no {part!r}; read a field of its JSON as steps.{step}.data.{part} "
                                      "(with an output: schema)", loc, line)
        for other in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            raise document.text_error(f"{owner} includes or imports another template; a workflow's templates are "
                                      "written whole in the file (macros may be defined in it)", loc, other.lineno)

    # --- running ---------------------------------------------------------------------------

    def resolve_inputs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Typed inputs: given values (strings from the command line are converted), then defaults.
        A value given as None is one not given (so inputs resolved once resolve again the same)."""
        check_inputs(given)
        values: dict[str, Any] = {}
        for name in given:
            if name not in self.spec.inputs:
                known = ", ".join(self.spec.inputs) or "none"
                close = difflib.get_close_matches(name, list(self.spec.inputs), n=1)
                raise ConfigError(f"unknown input {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                  + f" (declared: {known})", path=str(self.path))
        for name, declared in self.spec.inputs.items():
            if given.get(name) is not None:
                values[name] = _convert(name, given[name], declared, self)
            elif declared.default is not None:
                values[name] = declared.default
            elif declared.required:
                line, column = self.document.where(("inputs", name)) or (None, None)
                raise ConfigError(f"missing input {name!r}; {_pass_it(name)}", path=str(self.path), line=line,
                                  column=column)
            else:
                values[name] = None
        return values

    def defaulted(self, given: Mapping[str, Any]) -> list[str]:
        """The inputs ``resolve_inputs(given)`` takes from their declared defaults."""
        return [name for name, declared in self.spec.inputs.items()
                if given.get(name) is None and declared.default is not None]

    def task(self, inputs: Mapping[str, Any]) -> str:
        """The task text: the rendered ``task`` template, or the workflow's name and description."""
        if self.spec.task:
            return render_string(self.spec.task, where=f"{self.path}: task", inputs=inputs, steps={})
        return f"{self.name}: {self.spec.description}".rstrip(": ") or self.name

    def plan(self) -> Plan | None:
        """The explicit steps as a plan (None for ``plan: auto``)."""
        if self.spec.plan == "auto":
            return None
        return Plan(subtasks=[Subtask(id=s.id, instruction=s.description.strip() or _first_line(s.prompt),
                                      depends_on=list(s.needs), skills=list(s.recruit.skills) if s.recruit else [])
                              for s in self.spec.steps])

    def node_settings(self, inputs: Mapping[str, Any]) -> dict[str, NodeSettings]:
        """Each step's recruiting, aggregation, output schema and prompt renderer."""
        settings = {}
        graph = Dag({step.id: step.needs for step in self.spec.steps})
        for step in self.spec.steps:
            where = f"{self.path}: step {step.id!r}"
            settings[step.id] = NodeSettings(
                k=step.recruit.k if step.recruit else None, mode=step.recruit.mode if step.recruit else None,
                aggregate=step.aggregate, agent=step.agent,
                skills=tuple(step.recruit.skills) if step.recruit else (), output=step.output,
                prompt=_renderer(step.prompt, where, inputs, blank="the prompt is empty once rendered",
                                 reads=(step.id, _Ancestors(graph, step.id), list(graph.dependencies))))
        return settings

    def final(self, inputs: Mapping[str, Any]) -> Any:
        """The final-answer renderer, when the workflow defines one (a ``plan: auto`` one also checks
        the plan, once it is made, for the steps it reads)."""
        if self.spec.final is None:
            return None
        where = f"{self.path}: final"
        if self.spec.plan == "auto":
            return PlannedFinal(self.spec.final, where, inputs)
        return _renderer(self.spec.final, where, inputs, blank=_BLANK_FINAL)


class PlannedFinal:
    """The ``final`` template of a ``plan: auto`` workflow, whose steps the planner names at run time.

    ``check_plan`` runs once the plan is made, before any step: a template that reads a step the
    plan lacks (``steps.summary.output``, no step ``summary``) would fail only after every step
    was paid for.
    """

    def __init__(self, source: str, where: str, inputs: Mapping[str, Any]) -> None:
        self.source, self.where, self.inputs = source, where, dict(inputs)
        self.named = list(dict.fromkeys(name for name, kind, _ in _references(environment().parse(source))
                                        if kind == "steps"))

    def __call__(self, outputs: Outputs) -> str:
        text = render_string(self.source, where=self.where, inputs=self.inputs, steps=outputs)
        if not text.strip():
            raise ConfigError(f"{RENDER_FAILED}{self.where}: {_BLANK_FINAL}")
        return text

    def check_plan(self, planned: list[str]) -> str | None:
        """Why the template cannot render with these steps, or None. A step it names but the plan
        lacks is a problem only where reading it fails (not behind ``steps.get(...)`` or ``is
        defined``): the template is tried with placeholder outputs without, then with, those steps."""
        missing = [name for name in self.named if name not in planned]
        if not missing:
            return None
        try:
            self(_placeholders(planned))
            return None
        except ConfigError:
            pass
        try:
            self(_placeholders([*planned, *missing]))
        except ConfigError:  # it fails for another reason too: the run's own rendering says which
            return None
        return (f"{RENDER_FAILED}{self.where}: it reads steps.{missing[0]}, but the plan has no step "
                f"{missing[0]!r} (its steps: {', '.join(planned)}); with plan: auto, read the steps in a loop "
                "(steps.items()) or write the steps out")


def _placeholders(steps: list[str]) -> Outputs:
    """Outputs for a trial rendering: each step with a short text and no data."""
    return {step: {"output": f"(the output of {step})", "data": None} for step in steps}


#: why a final template that renders blank is an error (a run was `done` with an empty answer, exit 0)
_BLANK_FINAL = "the answer is empty once rendered (a template that writes nothing for these inputs)"


def _renderer(source: str, where: str, inputs: Mapping[str, Any], *, blank: str = "",
              reads: tuple[str, _Ancestors, list[str]] | None = None) -> Any:
    """The template as a function of the steps' outputs; ``blank``: why a blank rendering is an
    error (a step's prompt: its experts would be sent nothing to do); ``reads``: a step's id, the
    steps it needs (directly or not), which alone it sees, and every step's id."""
    def render(outputs: Outputs) -> str:
        steps = outputs if reads is None else _StepsSeen(outputs, *reads)
        text = render_string(source, where=where, inputs=dict(inputs), steps=steps)
        if blank and not text.strip():
            raise ConfigError(f"{RENDER_FAILED}{where}: {blank}")
        return text
    return render


class _StepsSeen(dict[str, Any]):
    """The outputs a step's prompt sees: the steps it needs, directly or not (a name the template
    works out, ``steps[name]``, read whichever steps had happened to finish first). Another step
    read is undefined with a hint naming what to fix (it said "'dict object' has no attribute 'b'")."""

    def __init__(self, outputs: Outputs, step: str, needed: _Ancestors, every: list[str]) -> None:
        super().__init__((name, output) for name, output in outputs.items() if name in needed)
        self.step, self.every = step, every

    def __missing__(self, name: str) -> StrictUndefined:
        if name == self.step:
            hint = "it reads its own output, which it is writing"
        elif name in self.every:
            hint = f"it reads steps[{name!r}] but does not need {name!r}; add {name!r} to its needs"
        else:
            hint = f"it reads steps[{name!r}], and there is no step {name!r} (steps: {', '.join(self.every)})"
        return StrictUndefined(hint=hint, name=str(name))


#: a step id or input name with a dash, written after a dot (Jinja reads the dash as a minus)
_DASHED_NAME = re.compile(r"\b(steps|inputs)\.(\w+(?:-\w+)+)(\.\w+)?")


def _unaliased(tree: nodes.Template) -> nodes.Template:
    """``tree`` with each name given a step or the inputs once (``{% set s = steps.a %}``, ``{% with s =
    steps.a %}``) read as what it names, so its parts are checked as ``steps.a``'s are. A name given
    more than once, or anything else, is left as it is (the run finds what is wrong with it)."""
    given: dict[str, list[nodes.Node]] = {}
    for assign in tree.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name):
            given.setdefault(assign.target.name, []).append(assign.node)
    for block in tree.find_all(nodes.With):
        for target, value in zip(block.targets, block.values):
            if isinstance(target, nodes.Name):
                given.setdefault(target.name, []).append(value)
    for bound in tree.find_all((nodes.For, nodes.Macro, nodes.CallBlock)):  # (a loop's or macro's own names)
        for name in bound.find_all(nodes.Name):
            if name.ctx in ("store", "param"):
                given.setdefault(name.name, []).append(name)
    aliases = {name: values[0] for name, values in given.items() if len(values) == 1 and (
        _key(values[0], "steps") is not None
        or (isinstance(values[0], nodes.Name) and values[0].name in ("steps", "inputs")))}
    if not aliases:
        return tree

    class Unalias(NodeTransformer):
        def visit_Name(self, node: nodes.Name) -> nodes.Node:
            value = aliases.get(node.name) if node.ctx == "load" else None
            return node if value is None else copy.deepcopy(value).set_lineno(node.lineno, override=True)

    return cast(nodes.Template, Unalias().visit(copy.deepcopy(tree)))


def _references(tree: nodes.Template) -> list[tuple[str, str, int]]:
    """``(name, "inputs" | "steps", line)`` for every ``inputs.x`` / ``steps.x`` (or ``["x"]``, or
    ``.get("x")``) in a template."""
    found = []
    called = _called(tree)
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Call)):
        assert isinstance(node, (nodes.Getattr, nodes.Getitem, nodes.Call))
        base = node.node if isinstance(node, (nodes.Getattr, nodes.Getitem)) else _get_of(node)
        if not isinstance(base, nodes.Name) or base.name not in ("inputs", "steps"):
            continue
        if isinstance(node, nodes.Getattr):
            if id(node) not in called:  # (steps.items() is the dict's, whatever the steps are named)
                found.append((node.attr, base.name, node.lineno))
            continue
        name = _constant(node.arg if isinstance(node, nodes.Getitem) else node.args[0])
        if name is not None:
            found.append((name, base.name, node.lineno))
    return found


def _step_parts(tree: nodes.Template) -> list[tuple[str, str, int]]:
    """``(step, part, line)`` for every ``steps.<id>.<part>`` (or ``["..."]``, or ``.get("...")``) in a
    template (a step picked by a computed name, ``steps[name]`` in a loop, is left to the run)."""
    found = []
    called = _called(tree)
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Call)):
        assert isinstance(node, (nodes.Getattr, nodes.Getitem, nodes.Call))
        if isinstance(node, nodes.Call):
            base = _get_of(node)
            name, part = (_key(base, "steps"), _constant(node.args[0])) if base is not None else (None, None)
        else:
            name = _key(node.node, "steps")
            part = node.attr if isinstance(node, nodes.Getattr) else _constant(node.arg)
            if id(node) in called:  # steps.a.get(...), steps.a.items(): the dict's methods
                continue
        if name is not None and part is not None:
            found.append((name, part, node.lineno))
    return found


#: schema keywords through which an object may have properties its own ``properties`` does not list
_OPENING = dict.fromkeys(("patternProperties", "allOf", "anyOf", "oneOf", "if", "then", "else", "$ref",
                          "dependentSchemas", "unevaluatedProperties"))


def _chains(tree: nodes.Template, part: str) -> list[tuple[str, list[str | int], int]]:
    """``(step, path, line)`` for every ``steps.<id>.<part>`` read further (``.x``, ``["x"]``, ``[0]``)
    in a template: the path after ``part``, as far as it is written with constants, not ending in a
    call (``data.get(...)``, ``data.items()`` and a name computed in a loop are left to the run)."""
    found = []
    called = _called(tree)
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, (nodes.Getattr, nodes.Getitem))
        if id(node) in called:
            continue
        path: list[str | int] = []
        current: nodes.Node = node
        while isinstance(current, (nodes.Getattr, nodes.Getitem)):
            if isinstance(current.node, (nodes.Getattr, nodes.Getitem, nodes.Call)) and _key(current.node, "steps"):
                head = current.attr if isinstance(current, nodes.Getattr) else _constant(current.arg)
                if head == part and path:
                    found.append((_key(current.node, "steps") or "", path[::-1], node.lineno))
                break
            key = current.attr if isinstance(current, nodes.Getattr) else _index(current.arg)
            if key is None:
                break
            path.append(key)
            current = current.node
    return found


def _data_paths(tree: nodes.Template) -> list[tuple[str, list[str | int], int]]:
    """``(step, path, line)`` for every ``steps.<id>.data.<path>`` in a template (see ``_chains``)."""
    return _chains(tree, "data")


def _text_parts(tree: nodes.Template) -> list[tuple[str, str, int]]:
    """``(step, name, line)`` for every ``steps.<id>.output.<name>`` (or ``["name"]``) in a template: a
    step's output is its text, whose characters ``[0]`` and methods (``.upper()``) are left alone."""
    return [(step, path[0], line) for step, path, line in _chains(tree, "output") if isinstance(path[0], str)]


def _path_problem(schema: Any, path: Sequence[str | int]) -> str | None:
    """What reading ``path`` of a value that follows ``schema`` cannot find (None: nothing known to be
    wrong): a property a closed object does not list, a named field of a list."""
    where = ""  # (the path read so far, after data)
    for part in path:
        if not isinstance(schema, dict) or _OPENING.keys() & schema:
            return None
        if schema.get("type") == "array":
            if isinstance(part, int):
                schema, where = schema.get("items"), f"{where}[{part}]"
                continue
            return (f"makes data{where} a list (type: array), which has no field {part!r}; read its items by index "
                    "or in a loop")
        if isinstance(part, int):
            return None
        listed, extra = schema.get("properties"), schema.get("additionalProperties", False)
        # (closed only where nothing else may add a property: allOf/anyOf, an open additionalProperties ({}))
        if isinstance(listed, dict) and part not in listed and extra is False:
            has = ", ".join(sorted(listed)) or "none"
            return (f"has no property {part!r}{f' in data{where}' if where else ''} (it has: {has}); fix the name, "
                    "or list it under properties")
        schema, where = listed.get(part) if isinstance(listed, dict) else None, f"{where}.{part}"
    return None


def _index(node: nodes.Node) -> str | int | None:
    """A constant key or index (``["x"]``, ``[0]``), else None."""
    if isinstance(node, nodes.Const) and isinstance(node.value, (str, int)) and not isinstance(node.value, bool):
        return node.value
    return None


def _called(tree: nodes.Template) -> set[int]:
    """The ids of the attribute reads a template calls (``x.items()``: a method, not a key)."""
    return {id(call.node) for call in tree.find_all(nodes.Call) if isinstance(call.node, nodes.Getattr)}


def _get_of(call: nodes.Call) -> nodes.Node | None:
    """``x`` for a call ``x.get("key")`` (its first argument a constant), else None."""
    func = call.node
    if isinstance(func, nodes.Getattr) and func.attr == "get" and call.args and _constant(call.args[0]) is not None:
        return func.node
    return None


def _key(node: nodes.Node, base: str) -> str | None:
    """``x`` for ``base.x``, ``base["x"]`` or ``base.get("x")``, else None."""
    if isinstance(node, nodes.Call):
        of = _get_of(node)
        return _constant(node.args[0]) if isinstance(of, nodes.Name) and of.name == base else None
    if not isinstance(node, (nodes.Getattr, nodes.Getitem)) or not isinstance(node.node, nodes.Name) \
            or node.node.name != base:
        return None
    return node.attr if isinstance(node, nodes.Getattr) else _constant(node.arg)


def _constant(node: nodes.Node) -> str | None:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else None


def _load_pool(spec: WorkflowFile, document: YamlDocument, file: Path) -> Pool:
    if isinstance(spec.pool, dict):
        return Pool.from_document(document, loc=("pool",), base=file.parent)
    if isinstance(spec.pool, str):
        pool_path = file.parent / spec.pool
        if not pool_path.is_file():
            why = "is a folder, not a pool file" if pool_path.is_dir() else "not found"
            raise document.error(f"pool file {why}: {pool_path}" if why == "not found" else f"{pool_path} {why}",
                                 ("pool",))
        return Pool.load(pool_path)
    return Pool.load()


#: what YAML made of an unquoted value (``010`` is 8, ``12:30`` is 750, ``2024-01-01`` a date)
_YAML_KINDS = {"int": "a number", "float": "a number", "date": "a date", "datetime": "a date and time",
               "list": "a list", "dict": "a mapping"}


def _is_type(value: Any, kind: str) -> bool:
    return isinstance(value, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))


def _convert(name: str, value: Any, declared: InputSpec, workflow: Workflow) -> Any:
    """A given input as its declared type; a required string input must not be blank, a number
    must be finite."""
    converted = _typed(value, declared.type)
    where = ("inputs", name)  # (each error points at the input's declaration, as a missing input's does)
    if converted is None:
        if declared.type == "integer" and isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            raise workflow.document.error(f"input {name!r} has {len(value.strip().lstrip('+-')):,} digits, more than "
                                          f"the {sys.get_int_max_str_digits():,} Python reads as a number; pass a "
                                          "smaller one, or declare the input a string", where)
        raise workflow.document.error(f"input {name!r} must be of type {declared.type}, got {_shown(value)}", where)
    if isinstance(converted, float) and not math.isfinite(converted):
        raise workflow.document.error(f"input {name!r} must be a finite number, got {_shown(value)}", where)
    if isinstance(converted, str) and len(converted) > MAX_TEMPLATE_OUTPUT:  # (every step would fail, resumes too)
        raise workflow.document.error(f"input {name!r} is {len(converted):,} characters; a prompt holds at most "
                                      f"{MAX_TEMPLATE_OUTPUT:,} in all, its own text included: pass a shorter one",
                                      where)
    if declared.required and isinstance(converted, str) and not converted.strip():
        raise workflow.document.error(f"input {name!r} is required and was given empty; {_pass_it(name)}", where)
    return converted


def _pass_it(name: str) -> str:
    """How to give an input, on the command line and in Python (the same error reaches both)."""
    return f"pass it with -i {name}=VALUE (in Python: inputs={{{name!r}: ...}})"


def check_inputs(inputs: object) -> None:
    """Refuse workflow inputs that are not a mapping of names to values (None was "'NoneType' object
    is not iterable"; a list's items were read as input names)."""
    if not isinstance(inputs, Mapping):
        raise ConfigError("inputs must be a mapping of input names to values ({'name': value}; {} for none), not "
                          f"{type(inputs).__name__}")


def _shown(value: Any) -> str:
    """A given value as an error shows it: its repr, cut at 60 characters (then its length said)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{_cut(text)} ({len(str(value)):,} characters)"


#: a number as ``-i`` takes it: ASCII decimal digits (Python's ``int`` and ``float`` also read ``1_000``,
#: full-width and other scripts' digits), or a word for a number that is not finite (refused as such)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


def _typed(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (strings from the command line converted), or None when it is not one."""
    if not isinstance(value, str) or kind == "string":
        return value if _is_type(value, kind) else None
    text = value.strip()
    try:
        if kind == "integer":
            return int(text) if _INTEGER.fullmatch(text) else None
        if kind == "number":
            return float(text) if _NUMBER.fullmatch(text) else None
    except ValueError:  # (more digits than Python reads)
        return None
    if value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):  # (YAML's words, and 1/0)
        return value.strip().lower() in ("true", "yes", "on", "1")
    return None


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
    return line if len(line) <= 100 else line[:97] + "..."


def _cut(text: str, most: int = 60) -> str:
    """``text`` as an error shows it: at most ``most`` characters."""
    return text if len(text) <= most else text[:most - 3] + "..."


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` from ``-i`` flags; a pair without ``=``, or a key given twice, is an
    error naming it."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-i expects KEY=VALUE, got {pair!r}")
        if key.strip() in values:
            first = _cut(f"{key.strip()}={values[key.strip()]}")
            raise ConfigError(f"input {key.strip()!r} is given twice (-i {first} and -i {_cut(pair)}); give it once")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a command line's bytes that are not UTF-8 in its locale
            raise ConfigError(f"-i {key.strip()}: the value is not valid UTF-8 text in this locale") from None
        values[key.strip()] = value
    return values


def _input_default(loc: tuple[Any, ...]) -> bool:
    """Whether ``loc`` is an input's default (``inputs: {NAME: {default: ...}}``)."""
    return len(loc) == 3 and loc[0] == "inputs" and loc[2] == "default"
