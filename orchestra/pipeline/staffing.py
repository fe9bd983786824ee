"""Staffing: how the experts and the aggregator of a node are chosen.

In order: a node whose experts are *pinned* with the recruitment that chose them (a batch's
rare-expert filter) keeps it; a workflow step with a fixed ``agent`` gets that agent; otherwise
the node's skills (given by the plan or the step, else extracted from its instruction by the
keyword LLM) are matched onto the profile vocabulary and the recruiter chooses the team (the
``calibrated`` default: experts and aggregator for expected accuracy per cost; ``symbolic-moe``:
weighs every agent by suitability and competence and draws ``k``; see ``orchestra.recruit``).
Experts pinned by name alone (a resumed run) replace the chosen ones; one pinned agent of a k = 1
node (a served agent model) is kept without recruiting at all. A configured aggregator
aggregates every node; otherwise a calibrated team's own, else the pool's best measured one, or,
with ``aggregator_choice: per-node``, the best measured among the agents that fit the node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from orchestra.agents import Agent, Pool
from orchestra.errors import BudgetExceeded, ConfigError
from orchestra.matching import Match, SkillMatcher
from orchestra.models import ChatRequest, ChatResult, Model, Usage
from orchestra.models.metering import metering
from orchestra.recruit import Recruiter, Recruitment, SkillTable, aggregation_evidence, node_aggregator
from orchestra.settings import Settings
from orchestra.skills import SkillExtractor, skill_names
from orchestra.vocabulary import AggregatorChoice, Mode

#: not looked at yet (see ``Staffing.known``)
_UNKNOWN = object()
#: recruitments of fixed agents kept for reuse (see ``Staffing._fixed_agent``)
_FIXED_KEPT = 1024

Call = Callable[[Sequence[tuple[Model, ChatRequest]]], Awaitable[list[ChatResult | Exception]]]
"""Sends calls for a run and returns their outcomes."""


@dataclass(frozen=True)
class Pin:
    """Experts fixed for a node: by name (a resumed run), with the recruitment that chose them
    when it was made in this process (a batch's rare-expert filter)."""

    experts: tuple[str, ...]
    recruitment: Recruitment | None = None


@dataclass(slots=True)  # one per node: not frozen, as frozen fields cost a call each to set
class Staffed:
    """A node's recruitment, with what it cost and what went wrong on the way."""

    recruitment: Recruitment
    extraction_failure: str | None = None
    """Why the keyword LLM named no skill (recruiting then went on without skills)."""
    keyword_calls_failed: bool = False
    """Every keyword call failed (an endpoint or output error, not an answer without skills)."""
    embedding_usage: Usage | None = None
    """The matcher's embedding requests, when it made any."""
    matcher_model: str = ""


class Staffing:
    """Chooses experts and aggregators from a pool's profiles, with one run's settings.

    Args:
        pool: the agents, their profiles and the keyword model.
        settings: recruiting (``recruit``), skill extraction (``keywords``), matching
            (``matcher``), and the aggregator (``aggregator``, ``aggregator_choice``).
        matcher: a matcher object to use instead of ``settings.matcher`` (Python only).
    """

    def __init__(self, pool: Pool, settings: Settings, *, matcher: SkillMatcher | None = None) -> None:
        if settings.aggregator is not None and settings.aggregator not in pool:
            raise ConfigError(f"aggregator {settings.aggregator!r} is not an agent of pool {pool.name!r}")
        self.pool = pool
        self.table: SkillTable = pool.skill_table(settings.recruit)
        self.aggregator: Agent = pool.choose_aggregator(self.table, settings.aggregator)
        self.aggregator_fixed = bool(settings.aggregator or pool.aggregator)
        """The aggregator was configured: it aggregates every node, whatever the choice."""
        self.aggregator_reason = self._why_aggregator(settings.aggregator)
        """The explanation line of the pool's aggregator (the nodes it aggregates said nothing of why)."""
        self.recruiter = Recruiter(self.table, settings.recruit,
                                   aggregators=[self.aggregator.name] if self.aggregator_fixed else None)
        self.matcher: SkillMatcher = matcher or settings.matcher.build()
        self.extractor = SkillExtractor(settings.keywords)
        self.light = frozenset(a.name for a in pool.agents if not getattr(a.model, "heavy", False))
        self.aggregator_choice: AggregatorChoice = settings.aggregator_choice
        #: given skills -> their plain names and matches, for a matcher that needed no request for them
        self._matched: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[Match, ...]]] = {}
        #: (given skills, k, mode) -> the one recruitment every seed gets, or None where the seed draws
        self._settled: dict[tuple[tuple[str, ...], int, str], Recruitment | None] = {}
        #: (agent, given skills, why) -> the recruitment of a node whose one agent is fixed (a step's agent,
        #: the pool's only one): a recruitment is never changed, so nodes share it and its explanation
        self._fixed: dict[tuple[str, tuple[str, ...], str], Recruitment] = {}

    def known(self, skills: Sequence[str], *, seed: int, k: int, mode: Mode, agent: str | None = None,
              pin: Pin | None = None) -> Recruitment | None:
        """A node's experts when finding them takes no request (a pin, a fixed agent, or skills of
        its own matched before: the same for every node that names them); None otherwise."""
        if pin is not None and pin.recruitment is not None:
            return pin.recruitment
        if agent is not None:
            return self._fixed_agent(agent, skills, "fixed for this step")
        if pin is not None and k == 1 and len(pin.experts) == 1:  # one agent, kept on resume: nothing to recruit
            return Recruitment(experts=pin.experts, keywords=tuple(skills), matches=(), candidates=(),
                               mode="fixed", notes=(f"{pin.experts[0]}: as recorded with the run",))
        if k == 1 and len(self.pool.agents) == 1 and pin is None:  # one team only: keyword calls could not change it
            return self._fixed_agent(self.pool.agents[0].name, skills, "the pool's only agent", named=True)
        given = tuple(skills)
        found = self._matched.get(given) if skills else None
        if found is None or pin is not None:
            return None if found is None else self._drawn(*found, seed=seed, k=k, mode=mode, pin=pin)
        key = (given, k, mode)
        settled = self._settled.get(key, _UNKNOWN)
        if isinstance(settled, Recruitment):
            return settled
        recruitment = self._drawn(*found, seed=seed, k=k, mode=mode, pin=None)
        if settled is _UNKNOWN:  # (the matches of these skills are fixed: asked once)
            self._settled[key] = None if self.recruiter.draws(found[1], mode) else recruitment
        return recruitment

    def _fixed_agent(self, agent: str, skills: Sequence[str], why: str, *, named: bool = False) -> Recruitment:
        """The recruitment of a node whose one agent is fixed (``why``), made once per agent, skills
        and reason; ``named``: its keywords are the skills' plain names."""
        key = (agent, tuple(skills), why)
        known = self._fixed.get(key)
        if known is None:
            if len(self._fixed) >= _FIXED_KEPT:  # (a long-lived server meets ever new skills)
                self._fixed.clear()
            keywords = tuple(skill_names(skills, 40)) if named else key[1]
            known = self._fixed[key] = Recruitment(experts=(agent,), keywords=keywords, matches=(), candidates=(),
                                                   mode="fixed", notes=(f"{agent}: {why}",))
        return known

    async def recruit(self, instruction: str, skills: Sequence[str], call: Call, *, seed: int, k: int, mode: Mode,
                      agent: str | None = None, pin: Pin | None = None) -> Staffed:
        """A node's experts (see the module's docstring for the order of the rules).

        Args:
            instruction: what the node does (skills are extracted from it when none are given).
            skills: skills given by the plan or the workflow step.
            call: sends the keyword requests.
            seed: the node's seed (keyword sampling and the draw).
            k: experts to draw; mode: how.
            agent: a workflow step's fixed expert.
            pin: experts fixed for this node.
        """
        known = self.known(skills, seed=seed, k=k, mode=mode, agent=agent, pin=pin)
        if known is not None:
            return Staffed(known)
        failure, calls_failed = None, False
        keywords = skill_names(skills, 40)  # a planner's skills too: plain words only
        extracted = not keywords and mode not in ("global", "random")  # these baselines ignore skills
        if extracted:
            keywords, failure, calls_failed = await self._extract(instruction, call, seed)
        matches, usage = await self._match(keywords)
        if extracted and failure is None and keywords and not matches and self.table.vocabulary:
            # (recruited as if no skill mattered, and nothing said so)
            failure = f"its keywords ({', '.join(keywords)}) name none of the pool's skills"
        if keywords and not extracted and usage is None:  # skills of their own: the same for every node
            if len(self._matched) >= 4096:
                self._matched.clear()
                self._settled.clear()
            self._matched[tuple(skills)] = (tuple(keywords), tuple(matches))
        return Staffed(self._drawn(keywords, matches, seed=seed, k=k, mode=mode, pin=pin), failure, calls_failed,
                       usage, getattr(self.matcher, "model", "matcher"))

    def unmatched(self, skills: Sequence[str], recruitment: Recruitment) -> str | None:
        """Why a node recruited on skills of its own (the plan's, the step's) was recruited as if no
        skill mattered: they name none of the pool's skills; None where one matched, no skill was
        weighed (a fixed agent, ``global``, ``random``), its keywords were extracted, or the pool has
        no skills to name."""
        if recruitment.matches or recruitment.mode in ("fixed", "global", "random") or not self.table.vocabulary:
            return None
        given = skill_names(skills, 40)  # (none: the keyword LLM's were weighed, and said of in ``recruit``)
        return f"its skills ({', '.join(given)}) name none of the pool's skills" if given else None

    def _drawn(self, keywords: Sequence[str], matches: Sequence[Match], *, seed: int, k: int, mode: Mode,
               pin: Pin | None) -> Recruitment:
        recruitment = self.recruiter.recruit(keywords, matches, seed=seed, k=k, mode=mode)
        if pin is not None:  # a resumed run keeps the experts its batch's rare-expert filter chose
            recruitment = replace(recruitment, experts=pin.experts,
                                  notes=(*recruitment.notes, "experts as first recruited"))
        return recruitment

    async def _extract(self, instruction: str, call: Call, seed: int) -> tuple[list[str], str | None, bool]:
        """Keywords from the keyword LLM, or none, the reason and whether every call failed."""
        model = self.pool.keyword_model
        assert model is not None  # a Pool always has one (its planner's, by default)
        outcomes = await call([(model, r) for r in self.extractor.requests(instruction, seed=seed)])
        budget_errors = [o for o in outcomes if isinstance(o, BudgetExceeded)]
        if budget_errors:
            raise budget_errors[0]
        keywords = self.extractor.combine(outcomes)
        if keywords:
            return keywords, None, False
        return [], self.extractor.failure(outcomes), all(isinstance(o, Exception) for o in outcomes)

    async def _match(self, keywords: Sequence[str]) -> tuple[list[Match], Usage | None]:
        """Keywords mapped onto the profile vocabulary, and the embedding usage this took."""
        with metering() as meter:  # an embedding matcher's requests belong to this run too
            matches = await self.matcher.match(keywords, self.table.vocabulary)
        return list(matches), meter.usage if meter.requests else None

    def aggregator_for(self, recruitment: Recruitment) -> tuple[str, str | None]:
        """The node's aggregator and, for a per-node choice, the line that explains it."""
        team = recruitment.team
        if team is not None and team.aggregator is not None and not self.aggregator_fixed:
            return team.aggregator, None  # chosen with the team (the explanation says why)
        if self.aggregator_choice != "per-node" or self.aggregator_fixed:
            return self.aggregator.name, self.aggregator_reason
        choice = node_aggregator(self.pool.profiles, self.table.competence, recruitment, self.aggregator.name)
        return choice.agent, choice.explain()

    def _why_aggregator(self, configured: str | None) -> str:
        """Why the pool's aggregator aggregates (``configured``: the run's setting)."""
        name = self.aggregator.name
        if configured or self.pool.aggregator:
            return f"aggregator {name}: " + ("set in the run's settings" if configured else "set in the pool")
        evidence = aggregation_evidence(self.pool.profiles.get(name))
        if evidence is not None:
            return (f"aggregator {name}: the pool's best measured aggregator (score {evidence[0]:.3f}; "
                    "aggregator_choice: per-node picks one per node)")
        if len(self.table.competence) == 1:  # (it said "nothing measured (run orchestra profile)" after a profile)
            return f"aggregator {name}: the pool's only agent"
        gamma = self.table.competence.get(name)
        if gamma is not None and len(set(self.table.competence.values())) > 1:
            return f"aggregator {name}: no aggregation measured; the highest global competence (γ={gamma:.3f})"
        if gamma is not None and self.pool.profiles:  # (profiled alike: profiling again measures the same)
            return (f"aggregator {name}: no aggregation measured, and every agent's global competence is equal "
                    f"(γ={gamma:.3f}): the last agent by name")
        return f"aggregator {name}: nothing measured (run orchestra profile): the last agent by name"

    def filter_rare(self, recruitments: Sequence[Recruitment], *, seed: int) -> list[Recruitment]:
        """A batch's recruitments with rarely chosen experts replaced (see ``Recruiter.filter_rare``)."""
        return self.recruiter.filter_rare(recruitments, seed=seed, light=self.light)
