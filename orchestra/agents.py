"""Agents (experts) and pools: who can be recruited, on which model, with which measured skills."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestra.errors import ConfigError
from orchestra.models import ChatRequest, Model
from orchestra.models.base import model_identity
from orchestra.models.config import ModelSpec, build_models
from orchestra.models.pricing import FREE, Price
from orchestra.numbers import Amount, Count
from orchestra.profile import (
    SkillProfile,
    answering_changes,
    load_profiles,
    model_endpoint,
    model_id,
    stale_profiles,
)
from orchestra.recruit import (
    DEFAULT_AGGREGATION_TOKENS,
    DEFAULT_ANSWER_TOKENS,
    RecruitConfig,
    SkillTable,
    choose_aggregator,
)
from orchestra.resources import default_pool_path
from orchestra.settings import Settings
from orchestra.yamlfile import YamlDocument, read_yaml

DEFAULT_PERSONA = "You are a knowledgeable, careful expert. Reason step by step, then answer."


@dataclass(eq=False)
class Agent:
    """An expert: a name, a model, a persona (system prompt) and sampling settings.

    ``skills`` are declared skills, used only until the agent has a measured profile.
    """

    name: str
    model: Model
    persona: str = DEFAULT_PERSONA
    temperature: float | None = None
    max_tokens: int | None = None
    skills: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        # checked once here, as its requests are built without validation (``ChatRequest.checked``)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"an agent's name must be non-empty text, not {self.name!r}")
        if not self.name.isprintable():  # (a newline or an escape broke every one-line listing it is in)
            raise ConfigError(f"an agent's name must be printable text on one line, not {self.name!r}")
        _check_model(self.model, f"agent {self.name!r}: model")
        try:
            skills = None if isinstance(self.skills, str) else tuple(self.skills)  # (a generator is read once)
        except TypeError:
            skills = None
        if skills is None or not all(isinstance(skill, str) for skill in skills):
            raise ConfigError(f"agent {self.name!r}: skills must be a list of names (e.g. skills=[\"algebra\"]), "
                              f"not {self.skills!r}")
        self.skills = skills
        if not isinstance(self.persona, str):
            raise ConfigError(f"agent {self.name!r}: persona must be text, not {type(self.persona).__name__}")
        if self.temperature is not None:
            if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                    or not 0 <= self.temperature <= 2:
                raise ConfigError(f"agent {self.name!r}: temperature must be a number from 0 to 2, "
                                  f"not {self.temperature!r}")
            self.temperature = float(self.temperature)
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ConfigError(f"agent {self.name!r}: max_tokens must be a whole number of at least 1, "
                              f"not {self.max_tokens!r}")

    def request(self, prompt: str, *, seed: int | None = None, output: Any = "text", max_tokens: int | None = None,
                temperature: float | None = None, on_text: Callable[[str], None] | None = None) -> ChatRequest:
        """A request from this agent: its persona as the system prompt and its sampling settings
        (``max_tokens`` and ``temperature`` replace the agent's own when given; ``on_text``: see
        ``ChatRequest``)."""
        temperature = self.temperature if temperature is None else temperature
        max_tokens = max_tokens or self.max_tokens
        plain = (type(prompt) is str and type(seed) in _SEEDS and type(temperature) in _TEMPERATURES
                 and type(max_tokens) in _LIMITS and (on_text is None or callable(on_text)))
        build = ChatRequest.checked if plain else ChatRequest.user  # anything else is validated (and converted)
        return build(prompt, system=self.persona or None, temperature=temperature, max_tokens=max_tokens, seed=seed,
                     output=output, on_text=on_text)


def _check_model(model: Any, what: str) -> None:
    """Refuse something that is not a model at once (the first call to it would fail mid-run), saying
    what a model of one's own lacks (a class with ``complete`` alone, or one that set no ``name``)."""
    if isinstance(model, Model) and isinstance(model.name, str):
        return
    kind = type(model).__name__
    if not isinstance(model, type) and callable(getattr(model, "complete", None)):
        if not callable(getattr(model, "complete_each", None)):
            raise ConfigError(f"{what} {kind} has complete but no complete_each (batches are sent through it): "
                              "subclass orchestra.models.ModelBase, set self.name and implement async "
                              "_generate(request) -> ChatResult (see the README, Your own model)")
        named = getattr(model, "name", None)
        problem = "has no name" if named is None else f"has a name that is not text ({type(named).__name__})"
        raise ConfigError(f"{what} {kind} {problem}: set self.name (how Orchestra shows the model) in its __init__")
    raise ConfigError(f"{what} must be a model object (an OpenAICompatible, a LlamaCpp, a FunctionModel, "
                      f"...), not {kind} {model!r:.60}; in a pool file, name one of its models")


# the types ``ChatRequest.checked`` takes as they are (an agent's own values are checked when it is made)
_SEEDS = (int, type(None))
_TEMPERATURES = (float, type(None))
_LIMITS = (int, type(None))


def _answering(model: Model | None) -> list[Any] | None:
    """What a model is and the options it adds to each request (``extra_body``, a default
    ``max_tokens``): what its answers depend on besides the request itself."""
    if model is None:
        return None
    return [model_identity(model), getattr(model, "extra_body", None), getattr(model, "default_max_tokens", None)]


def _unpriced(model: Model) -> bool:
    """Whether ``model`` has no price: none at all, or the price table's "not known" (``FREE`` itself;
    a price given as 0 is a price)."""
    price = getattr(model, "price", None)
    return price is None or price is FREE


def _price(model: Model) -> Price | None:
    """A model's price when it has one that is not zero (a model may have no price at all)."""
    price = getattr(model, "price", None)
    return price if price is not None and (price.input or price.output) else None


@dataclass(eq=False)
class Pool:
    """The agents available for recruiting, their profiles, and the models that plan and extract skills.

    Args:
        agents: the experts.
        profiles: measured skill profiles by agent name.
        planner: the model that writes plans (default: the first agent's model).
        keyword_model: the keyword LLM (default: the planner).
        aggregator: an agent name that always aggregates; default: the best aggregation score.
        name: shown in listings and provenance.
        profiles_dir: where ``orchestra profile`` writes this pool's profiles.
        source: the file the pool was read from.
        settings: run settings that suit this pool (a layer over the defaults; see ``Settings``).
        presets: named settings layers over ``settings`` (``orchestra serve`` serves each as a model).
    """

    agents: list[Agent]
    profiles: dict[str, SkillProfile] = field(default_factory=dict)
    planner: Model | None = None
    keyword_model: Model | None = None
    aggregator: str | None = None
    name: str = "pool"
    profiles_dir: Path | None = None
    source: Path | None = None
    settings: Settings = field(default_factory=Settings)
    presets: dict[str, Settings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.agents, Agent):  # (it was "TypeError: 'Agent' object is not iterable")
            raise ConfigError(f"agents= takes a list of Agent: agents=[{self.agents.name}], not the Agent alone")
        if not self.agents:
            raise ConfigError("a pool needs at least one agent")
        stray = next((a for a in self.agents if not isinstance(a, Agent)), None)
        if stray is not None:  # (Pool(agents=["a"]) was an AttributeError)
            raise ConfigError(f"a pool's agents are Agent objects, not {type(stray).__name__} ({stray!r:.60}): "
                              "Agent(name=..., model=...)")
        names = [a.name for a in self.agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"duplicate agent name(s) in pool: {', '.join(duplicates)}")
        if isinstance(self.aggregator, Agent):  # (the message printed the whole Agent)
            raise ConfigError(f"aggregator takes an agent's name: give the agent's name ({self.aggregator.name!r}), "
                              "not the Agent")
        if self.aggregator is not None and self.aggregator not in names:
            raise ConfigError(f"aggregator {self.aggregator!r} is not an agent of the pool")
        self.planner = self.planner or self.agents[0].model
        self.keyword_model = self.keyword_model or self.planner
        _check_model(self.planner, "the pool's planner")
        _check_model(self.keyword_model, "the pool's keyword_model")
        self._by_name = {a.name: a for a in self.agents}

    def __getitem__(self, name: str) -> Agent:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown agent {name!r}; the pool has {', '.join(self._by_name)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        """Agent names in pool order."""
        return [a.name for a in self.agents]

    @property
    def models(self) -> list[Model]:
        """Every distinct model the pool uses (agents, planner and keyword LLM)."""
        seen: dict[int, Model] = {}
        for model in [*(a.model for a in self.agents), self.planner, self.keyword_model]:
            if model is not None:
                seen.setdefault(id(model), model)
        return list(seen.values())

    def fingerprint(self) -> str:
        """A short hash of what makes this pool's answers: each agent's name, model (what it really is,
        endpoint and model id, and the request options it adds), persona, sampling settings and declared
        skills, the planner, the keyword model, the aggregator, the skill profiles and the models' prices
        (what a run's calls cost, and what the calibrated router weighs). A pool file edited in place
        (another model behind an agent, another price) gets another one; reformatting or comments do not."""
        described: dict[str, Any] = {
            "agents": [[a.name, _answering(a.model), a.persona, a.temperature, a.max_tokens, sorted(a.skills)]
                       for a in self.agents],
            "planner": _answering(self.planner), "keywords": _answering(self.keyword_model),
            "aggregator": self.aggregator,
            "profiles": {name: profile.model_dump(mode="json") for name, profile in sorted(self.profiles.items())},
        }
        prices = {model.name: [price.input, price.output] for model in self.models
                  if (price := _price(model)) is not None}
        if prices:  # (a pool without prices keeps the fingerprint it had before prices were part of it)
            described["prices"] = prices
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    async def aclose(self) -> None:
        """Close every model's open connections in this event loop: each distinct model once, and
        an endpoint shared by several models once (through the first of them)."""
        closed: set[int] = set()
        for model in self.models:
            owner = id(getattr(model, "endpoint", model))
            close = getattr(model, "aclose", None)
            if close is not None and owner not in closed:
                closed.add(owner)
                await close()

    def priced(self) -> bool:
        """Whether some agent's model has a price that is not zero (else every run costs $0)."""
        return any(_price(agent.model) for agent in self.agents)

    def unpriced(self) -> str | None:
        """Under a cost budget: the models with no price, whose calls count no dollars against it (so it
        does not bound them), as one warning line; None when every model has a price."""
        # (a price given as 0 is a price: only the table's "not known" is none)
        free = [model.name for model in self.models if _unpriced(model) and hasattr(model, "price")]
        # a model of one's own with no ``price`` at all: the cost it reports is counted, but only once paid
        own = [model.name for model in self.models if not hasattr(model, "price")]
        lines = []
        if free:
            lines.append(f"the cost budget counts no dollars for {', '.join(free)}: "
                         f"{'it has' if len(free) == 1 else 'they have'} no price (give prices: [input, output] per "
                         "million tokens in the pool, or prices= in Python)")
        if own:
            it = len(own) == 1
            lines.append(f"the cost budget cannot hold back calls to {', '.join(own)} in advance: "
                         f"{'it has' if it else 'they have'} no price (set self.price = orchestra.models.Price(input="
                         "..., output=...), USD per million tokens, in its __init__); the cost "
                         f"{'it reports' if it else 'they report'} in Usage.cost_usd is counted as its calls return")
        return "; ".join(lines) or None

    def check_credentials(self) -> None:
        """Raise ``AuthenticationError`` (one line, naming the variable) if a model's API key is not set."""
        for model in self.models:
            endpoint = getattr(model, "endpoint", None)
            if endpoint is not None:
                endpoint.api_key()

    def profile_warnings(self) -> list[str]:
        """What makes this pool's profiles unfit to route by, one line each: a ``profiles`` folder
        that is not there, agents with neither profile nor declared skills among profiled ones, and
        profiles measured on another model than the agent now has."""
        if self.profiles_dir is not None and not self.profiles_dir.is_dir():
            missing = "is a file, not a folder" if self.profiles_dir.exists() else "does not exist"
            return [f"the profiles folder {self.profiles_dir} {missing}: no agent has a measured profile, so "
                    "recruiting cannot route by skill (check the pool's `profiles:` path, or run orchestra profile)"]
        if not self.profiles:
            return []
        warnings = []
        # (an agent with declared skills is recruited on them until it is profiled, as documented)
        unprofiled = [agent.name for agent in self.agents if agent.name not in self.profiles and not agent.skills]
        if unprofiled:
            warnings.append(f"{', '.join(unprofiled)} {'has' if len(unprofiled) == 1 else 'have'} no measured "
                            "profile: recruited on a uniform prior until orchestra profile measures "
                            f"{'it' if len(unprofiled) == 1 else 'them'}")
        for agent in self.agents:
            profile = self.profiles.get(agent.name)
            if profile is None:
                continue
            if profile.provenance.model != model_id(agent.model):
                warnings.append(f"the profile of {agent.name} was measured on {profile.provenance.model}, but the "
                                f"pool now gives it {model_id(agent.model)}: run orchestra profile again")
            elif profile.provenance.endpoint and profile.provenance.endpoint != model_endpoint(agent.model):
                now = model_endpoint(agent.model) or "an in-process engine"
                warnings.append(f"the profile of {agent.name} was measured on {profile.provenance.endpoint}, but the "
                                f"pool now sends it to {now}: run orchestra profile again (unless that is the "
                                "same server)")
            changed = answering_changes(profile.provenance, agent.persona, agent.temperature, agent.max_tokens)
            if changed:
                warnings.append(f"the profile of {agent.name} was measured with another {' and '.join(changed)} than "
                                "the pool now gives it: run orchestra profile again")
        return warnings

    def skill_table(self, config: RecruitConfig) -> SkillTable:
        """Profiles, cold starts and prices in the form the recruiter uses."""
        prices = {a.name: getattr(a.model, "price", FREE) for a in self.agents}
        costs = {}
        for agent in self.agents:
            profile = self.profiles.get(agent.name)
            answer = (profile.answer_tokens if profile else None) or DEFAULT_ANSWER_TOKENS
            aggregation = (profile.aggregation_tokens if profile else None) or DEFAULT_AGGREGATION_TOKENS
            price = prices[agent.name]
            costs[agent.name] = (price.cost(*answer), price.cost(*aggregation))
        return SkillTable.build(self.names, self.profiles, {a.name: a.skills for a in self.agents},
                                {name: price.blended for name, price in prices.items()}, config, costs)

    def choose_aggregator(self, table: SkillTable, configured: str | None = None) -> Agent:
        """The aggregating agent: ``configured``, else the pool's own choice, else the best measured aggregator."""
        return self[choose_aggregator(self.profiles, table.competence, self.names, configured or self.aggregator)]

    @classmethod
    def load(cls, path: str | Path | None = None, *, profiles: bool = True) -> Pool:
        """Read a pool file (the embedded default pool when ``path`` is None); ``profiles=False``
        leaves its profiles unread (``orchestra profile`` measures them anew)."""
        file = Path(path) if path is not None else default_pool_path()
        document = read_yaml(file)
        data = document.data
        workflow_keys = sorted({"steps", "task", "pool"} & data.keys()) if isinstance(data, dict) else []
        if workflow_keys and "agents" not in data:
            has = " and ".join(f"{key}:" for key in workflow_keys)
            raise document.error(f"{file.name} is a workflow file (it has {has}), not a pool: run it with "
                                 f"`orchestra run {file}`, or give a pool file here")
        return cls.from_document(document, base=file.parent, source=file, profiles=profiles)

    @classmethod
    def from_document(cls, document: YamlDocument, *, loc: tuple[Any, ...] = (), base: Path,
                      source: Path | None = None, profiles: bool = True) -> Pool:
        """Build a pool from the pool data at ``loc`` of a YAML file (a pool file, or a workflow's inline pool)."""
        spec = document.validate(PoolFile, loc)
        _check_references(spec, document, loc)
        models = build_models(spec.models, base, lambda name, refused: document.error(  # (it named no file or model)
            f"models.{name}: {refused}", (*loc, "models", name)))
        agents = []
        for agent in spec.agents:
            agents.append(Agent(
                name=agent.name, model=models[agent.model or spec.defaults.model or ""],
                persona=agent.persona or spec.defaults.persona,
                temperature=agent.temperature if agent.temperature is not None else spec.defaults.temperature,
                max_tokens=agent.max_tokens or spec.defaults.max_tokens,
                skills=tuple(agent.skills), description=agent.description))
        profiles_dir = (base / spec.profiles) if spec.profiles else None
        measured = load_profiles(profiles_dir) if profiles_dir and profiles else {}
        if set(measured) - {a.name for a in agents}:
            assert profiles_dir is not None
            raise document.error(f"{profiles_dir} holds profiles of agents the pool does not have: "
                                 f"{stale_profiles(profiles_dir, (a.name for a in agents))}; move those files out "
                                 "of the folder (an agent removed or renamed since it was profiled)",
                                 (*loc, "profiles"))
        name = spec.name or (source.stem if source else "pool")
        return cls(agents=agents, profiles=measured,
                   planner=models[spec.planner] if spec.planner else None,
                   keyword_model=models[spec.keywords] if spec.keywords else None,
                   aggregator=spec.aggregator, name=name, profiles_dir=profiles_dir,
                   source=source, settings=spec.settings, presets=spec.presets)


# --- the pool file ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentDefaults(_Strict):
    """Values every agent gets unless it sets its own."""

    model: str | None = None
    persona: str = DEFAULT_PERSONA
    temperature: Amount | None = Field(default=None, ge=0, le=2)
    max_tokens: Count | None = Field(default=None, ge=1)


class AgentFile(_Strict):
    """One agent in a pool file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    model: str | None = None
    persona: str | None = None
    temperature: Amount | None = Field(default=None, ge=0, le=2)
    max_tokens: Count | None = Field(default=None, ge=1)
    skills: list[str] = []
    description: str = ""


class PoolFile(_Strict):
    """The schema of ``agents/pools/*.yaml``."""

    name: str | None = None
    description: str = ""
    models: dict[str, ModelSpec] = Field(min_length=1)
    defaults: AgentDefaults = AgentDefaults()
    planner: str | None = None
    keywords: str | None = None
    aggregator: str | None = None
    profiles: str | None = None
    settings: Settings = Settings()
    presets: dict[str, Settings] = {}
    agents: list[AgentFile] = Field(min_length=1)


def _check_references(spec: PoolFile, document: YamlDocument, loc: tuple[Any, ...]) -> None:
    known = set(spec.models)
    choices = ", ".join(sorted(known))
    for key in ("planner", "keywords"):
        value = getattr(spec, key)
        if value is not None and value not in known:
            raise document.error(f"{key} names unknown model {value!r}; models: {choices}", (*loc, key))
    if spec.defaults.model is not None and spec.defaults.model not in known:
        raise document.error(f"defaults.model names unknown model {spec.defaults.model!r}; models: {choices}",
                             (*loc, "defaults", "model"))
    names: list[str] = []
    for index, agent in enumerate(spec.agents):
        if agent.name in names:
            raise document.error(f"duplicate agent name {agent.name!r}", (*loc, "agents", index, "name"))
        names.append(agent.name)
        if agent.model is not None and agent.model not in known:
            raise document.error(f"agent {agent.name!r} names unknown model {agent.model!r}; models: {choices}",
                                 (*loc, "agents", index, "model"))
        if agent.model is None and spec.defaults.model is None:
            raise document.error(f"agent {agent.name!r} names no model and defaults.model is unset",
                                 (*loc, "agents", index))
    if spec.aggregator is not None and spec.aggregator not in names:
        raise document.error(f"aggregator {spec.aggregator!r} is not one of the agents: {', '.join(names)}",
                             (*loc, "aggregator"))
