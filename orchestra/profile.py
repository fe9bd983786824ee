"""Skill profiles: what each agent is measured to be good at, with where the measurement came from."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

from orchestra.errors import ConfigError

PROFILE_VERSION = 1
#: the most items a profile may say it was measured on (a hand-edited 10**400 failed as a traceback)
MAX_ITEMS = 10**9
_PAIR = re.compile(r"\[\s*([\d.]+),\s*([\d.]+)\s*\]")


def _within_items(pair: tuple[int, int]) -> tuple[int, int]:
    if pair[0] > pair[1]:
        raise ValueError(f"{pair[0]} correct of {pair[1]} items: (correct, items) needs correct <= items")
    return pair


def _known_version(version: int) -> int:
    if version < 1:
        raise ValueError(f"profile version {version} is no version Orchestra writes (they start at 1); "
                         "run orchestra profile again")
    if version > PROFILE_VERSION:
        raise ValueError(f"profile version {version} was written by a newer Orchestra (this one reads "
                         f"{PROFILE_VERSION}); upgrade Orchestra")
    return version


#: (correct, items) of a benchmark: counts, the first at most the second
Counts = Annotated[tuple[NonNegativeInt, NonNegativeInt], AfterValidator(_within_items)]
#: (accuracy, standard deviation) of a posterior
Estimate = tuple[Annotated[float, Field(ge=0, le=1)], NonNegativeFloat]


class Provenance(BaseModel):
    """How a profile was measured, so it can be trusted, compared or rebuilt."""

    model_config = ConfigDict(extra="allow")

    dataset: str
    dataset_sha256: str
    items: int = Field(ge=0, le=MAX_ITEMS)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model: str
    endpoint: str = ""
    """Where ``model`` was served (``model_endpoint``): "" for an in-process engine, or a profile
    written before this was recorded."""
    persona_sha256: str = ""
    """SHA-256 of the agent's persona when measured ("": a profile written before this was recorded)."""
    sampling: dict[str, int | float | None] | None = None
    """The agent's own ``temperature`` and ``max_tokens`` when measured (None: not recorded)."""
    keyword_model: str = ""
    grader: str = "auto"
    prompt_sha256: dict[str, str] = {}
    seed: int = 0


class SkillProfile(BaseModel):
    """One agent's measured skills: ``{keyword: +correct -wrong}``, plus pool-relative scores.

    The aggregation benchmark's result: ``aggregation_score`` (accuracy), over ``aggregation_items``
    items, with ``aggregation_stderr`` Agresti-Coull's sqrt(q(1-q)/(n+4)), q = (correct+2)/(n+4)
    (``AggregationResult.from_grades``); ``aggregation_skills`` is the same benchmark
    split by the items' keywords, ``{keyword: (correct, items)}`` (for per-node aggregator choice).
    Profiles written before these were recorded load with them unset.

    Calibration (see ``orchestra.calibration``): ``aliases`` maps each keyword variant onto its
    canonical skill (``orchestra.variants``); ``skill_counts`` is ``{canonical skill: (correct,
    items)}``, the evidence pooled over variants; ``estimates`` is ``{canonical skill: (accuracy,
    standard deviation)}``, the Beta posterior computed from those counts. ``answer_tokens`` and
    ``aggregation_tokens`` are the mean (prompt, completion) tokens of the agent's answers and of
    its aggregation calls while profiling: with the model's price, what one call is expected to
    cost. ``skills`` keeps the raw ±1 sums per keyword, so Symbolic-MoE's exact method still runs.
    """

    # (an infinite token mean made every other agent's cost nothing beside it; NaN failed as "not <= 1")
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Annotated[int, AfterValidator(_known_version)] = PROFILE_VERSION
    agent: str
    skills: dict[str, int]
    accuracy: float = Field(ge=0, le=1)
    competence: float = Field(default=0.0, ge=0)
    aggregation_score: float | None = Field(default=None, ge=0, le=1)
    aggregation_items: int | None = Field(default=None, ge=0, le=MAX_ITEMS)
    aggregation_stderr: float | None = Field(default=None, ge=0)
    aggregation_skills: dict[str, Counts] = {}
    aliases: dict[str, str] = {}
    skill_counts: dict[str, Counts] = {}
    estimates: dict[str, Estimate] = {}
    answer_tokens: tuple[NonNegativeFloat, NonNegativeFloat] | None = None
    aggregation_tokens: tuple[NonNegativeFloat, NonNegativeFloat] | None = None
    provenance: Provenance

    @model_validator(mode="after")
    def _measured_on_its_items(self) -> SkillProfile:
        # (a sum of -10**30 flattened every other agent's γ to 0.5, and an aggregator that was wrong won)
        for skill, total in self.skills.items():
            if not skill.strip():
                raise ValueError("skills: a skill has an empty name")
            if abs(total) > self.provenance.items:
                raise ValueError(f"skills.{skill}: {total} is beyond ±{self.provenance.items}, the items it was "
                                 "measured on (one +1 or -1 each); run orchestra profile again")
        # (a count of 10**400 loaded, then failed as an OverflowError traceback when it became a float)
        for field, counts, items in (("skill_counts", self.skill_counts, self.provenance.items),
                                     ("aggregation_skills", self.aggregation_skills, self.aggregation_items)):
            limit = MAX_ITEMS if items is None else items
            for skill, (_, seen) in counts.items():
                if seen > limit:
                    raise ValueError(f"{field}.{skill}: {seen} items, more than the {limit} it was measured on; "
                                     "run orchestra profile again")
        return self

    @property
    def total(self) -> int:
        """The profile's sum: the raw material of global competence."""
        return sum(self.skills.values())

    def top_sums(self, n: int = 4) -> list[tuple[str, int]]:
        """The ``n`` best ±1 sums, keyword variants under their skill as recruiting reads them (the
        sums count an item once per variant it got: "history +48" was 26 + 22 over 30 items)."""
        merged: dict[str, int] = {}
        for keyword, score in self.skills.items():
            skill = self.aliases.get(keyword, keyword)
            merged[skill] = merged.get(skill, 0) + score
        return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def top_estimates(self, n: int = 4) -> list[tuple[str, float, int]]:
        """The ``n`` best calibrated estimates: (skill, accuracy, items); none in a profile written
        before estimates were."""
        return sorted(((skill, self.estimates[skill][0], items) for skill, (_, items) in self.skill_counts.items()
                       if skill in self.estimates), key=lambda row: (-row[1], row[0]))[:n]

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/<agent>.json``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.agent}.json"
        ordered = self.model_copy(update={"skills": dict(sorted(self.skills.items(), key=lambda kv: (-kv[1], kv[0]))),
                                          "aggregation_skills": dict(sorted(self.aggregation_skills.items())),
                                          "aliases": dict(sorted(self.aliases.items())),
                                          "skill_counts": dict(sorted(self.skill_counts.items())),
                                          "estimates": dict(sorted(self.estimates.items()))})
        text = _PAIR.sub(r"[\1, \2]", ordered.model_dump_json(indent=2))  # pairs on one line
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SkillProfile:
        """Read a profile file; a bad one is a ``ConfigError`` naming it."""
        try:  # utf-8-sig: a byte-order mark some editors put first is not part of the JSON
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8-sig"))
        except OSError as error:
            raise ConfigError(f"cannot read profile ({error.strerror or error})", path=str(path)) from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"invalid skill profile: not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                              f"offset {error.start}); save it as UTF-8, or run orchestra profile again",
                              path=str(path)) from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])  # (none for a file that is not JSON)
            why = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"invalid skill profile: {f'{where}: ' if where else ''}{why}",
                              path=str(path)) from None


def load_profiles(directory: str | Path) -> dict[str, SkillProfile]:
    """Every ``*.json`` profile in ``directory`` by agent name (empty when the folder is absent); two
    files that profile one agent are refused (which one counts would depend on their names)."""
    return {agent: profile for agent, (profile, _) in profile_files(directory).items()}


def profile_files(directory: str | Path) -> dict[str, tuple[SkillProfile, Path]]:
    """``load_profiles`` with the file each profile was read from."""
    folder = Path(directory)
    if not folder.is_dir():
        return {}
    found: dict[str, tuple[SkillProfile, Path]] = {}
    for path in sorted(folder.glob("*.json")):
        profile = SkillProfile.load(path)
        if profile.agent in found:
            raise ConfigError(f"{found[profile.agent][1].name} and {path.name} both profile agent {profile.agent!r}; "
                              "keep one (move the other out of the folder)", path=str(folder))
        found[profile.agent] = (profile, path)
    return found


def stale_profiles(directory: str | Path, agents: Iterable[str]) -> str | None:
    """Which profile files in ``directory`` profile no agent of ``agents`` (one removed or renamed
    since it was profiled), as ``writer.json (agent 'writer')``, or None."""
    names = set(agents)
    stale = [f"{path.name} (agent {agent!r})" for agent, (_, path) in profile_files(directory).items()
             if agent not in names]
    return ", ".join(stale) or None


def model_id(model: object) -> str:
    """What a model is, for provenance: ``Type:model id`` (a file's name, not its local path, for
    in-process engines), never the pool's alias for it."""
    path = getattr(model, "path", None)
    detail = getattr(model, "model", None) or (Path(path).name if path else None) or getattr(model, "name", "")
    return f"{type(model).__name__}:{detail}"


def persona_sha256(persona: str) -> str:
    """The persona as a profile's provenance records it."""
    return hashlib.sha256(persona.encode("utf-8", "surrogatepass")).hexdigest()


def answering_changes(provenance: Provenance, persona: str, temperature: float | None,
                      max_tokens: int | None) -> list[str]:
    """Which of an agent's persona, temperature and max_tokens differ from what its profile was
    measured with (of those the profile recorded): an agent told to be another expert is not the one measured."""
    changed = ["persona"] if provenance.persona_sha256 and provenance.persona_sha256 != persona_sha256(persona) else []
    if provenance.sampling is not None:
        changed += [name for name, now in (("temperature", temperature), ("max_tokens", max_tokens))
                    if provenance.sampling.get(name) != now]
    return changed


def model_endpoint(model: object) -> str:
    """Where a model is served, for provenance: an HTTP endpoint's base URL without credentials or
    query (a server answers with one model name whatever it runs, so the name alone does not say
    which server was measured); "" for an in-process engine."""
    base_url = getattr(getattr(model, "endpoint", None), "base_url", None)
    if not isinstance(base_url, str):
        return ""
    parts = urlsplit(base_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def global_competence(totals: Mapping[str, float], temperature: float = 0.5) -> dict[str, float]:
    """γ per agent, as Symbolic-MoE defines it.

    Shift every profile sum by ``-min + 1`` when the minimum is negative, raise to ``1/T``, and
    normalise to sum 1.
    """
    if not totals:
        return {}
    low = min(totals.values())
    shifted = {name: value - low + 1 if low < 0 else value for name, value in totals.items()}
    # in logarithms, the largest taken out before the power: a sum of 300 at T = 0.005 overflowed a float
    logs = {name: math.log(value) / temperature for name, value in shifted.items() if value > 0}
    if not logs:
        return {name: 1 / len(totals) for name in totals}
    top = max(logs.values())
    powered = {name: math.exp(logs[name] - top) if name in logs else 0.0 for name in totals}
    norm = sum(powered.values())
    return {name: value / norm for name, value in powered.items()}
