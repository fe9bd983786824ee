"""Profiling: measure every agent on a labelled validation set and turn the results into skill profiles.

As Symbolic-MoE does it: the keyword LLM names each item's skills; every agent answers every item
(each agent's items go to its model as one batch); each keyword of an item gets +1 in an agent's
profile when it answered correctly and -1 when not. Then global competence, and the aggregation
benchmark: items of one correct and two incorrect traces, shuffled, that each candidate must
synthesize into the right answer; its accuracy is its aggregation score. By default the benchmark
uses every usable item (one with a correct and two incorrect traces): on 30 items the standard
error of a score is about 0.09, more than the gap between good aggregators. Each profile records
the item count and the standard error, and the benchmark's results per canonical skill.

Beyond the paper: keyword variants are merged into canonical skills (``orchestra.variants``), and
each profile records its (correct, items) per canonical skill with their calibrated estimates
(``orchestra.calibration``), and the mean tokens of its answers and aggregation calls (what a
call costs at the model's price).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestra.agents import Agent, Pool
from orchestra.budget import Budget
from orchestra.calibration import skill_estimates
from orchestra.core import run_sync
from orchestra.datasets import Dataset, Item
from orchestra.errors import BudgetExceeded, InvalidOutput, ProfilingIncomplete
from orchestra.events import CallsResolved, Event, EventBus, UsageUpdated
from orchestra.execute import Executor, ResponseCache, RunLedger
from orchestra.grading import Grader, answer_format, check_grader, get_grader
from orchestra.matching import SkillMatcher
from orchestra.models import ChatResult, Usage
from orchestra.pipeline.aggregation import Response, synthesize_prompt
from orchestra.profile import Provenance, SkillProfile, global_competence, model_endpoint, model_id, persona_sha256
from orchestra.prompts import render_expert, template_hash
from orchestra.skills import KeywordConfig, SkillExtractor
from orchestra.variants import Vocabulary, merge_variants, pooled_counts

T = TypeVar("T")
Progress = Callable[[str, int, int], None]
"""Called as (stage, calls completed, calls in the stage)."""


@dataclass
class ProfilingReport:
    """The profiles, plus what produced them (per-item keywords and grades) for inspection."""

    profiles: dict[str, SkillProfile]
    item_keywords: dict[str, list[str]]
    correct: dict[str, dict[str, bool]]
    aggregation_items: int
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    """The canonical skills and the keyword variants merged into each."""
    written: list[Path] = field(default_factory=list)
    reused: int = 0
    """Calls answered from ``cache`` (answers recorded by an earlier, interrupted profile) instead of sent."""
    calls: int = 0
    """Calls sent to the models (``reused`` ones aside)."""
    usage: Usage = field(default_factory=Usage)
    """What those calls cost: requests (retries and repairs too), tokens and USD."""
    answered_alike: list[tuple[str, str, int]] = field(default_factory=list)
    """Pairs of agents that gave the same answer on every item (and how many): see ``answered_alike``."""


#: the fewest items two agents must have answered alike to be named as one expert twice, and the fewest
#: of them both got wrong (two agents right on every item agree without being one)
ALIKE_MIN_ITEMS = 20
ALIKE_MIN_WRONG = 3


class ProfilingSpent:
    """What a profile has reused and spent so far, read from its accounts when asked: a profile
    that stopped (Ctrl-C) counts its requests cancelled in flight as its event loop ends."""

    def __init__(self, ledger: RunLedger) -> None:
        self._ledger = ledger

    @property
    def reused(self) -> int:
        """Calls answered from the cache instead of sent."""
        return self._ledger.answered["cache"]

    @property
    def calls(self) -> int:
        """Calls sent to the models."""
        return self._ledger.budget.calls

    @property
    def usage(self) -> Usage:
        """What those calls cost: requests (retries and repairs too), tokens and USD."""
        spent = self._ledger.budget
        return spent.usage


def expert_prompt(item: Item) -> str:
    """The zero-shot chain-of-thought prompt an expert sees for a validation item."""
    question = item.prompt()
    return render_expert(task=question, instruction=question, inputs=[], answer_format=answer_format(item),
                         context="")


class _Counter:
    """Turns the executor's per-call usage events into progress callbacks for one stage."""

    def __init__(self, events: EventBus, run_id: str, progress: Progress | None) -> None:
        self.run_id, self.progress = run_id, progress
        self.stage, self.total, self.done = "", 0, 0
        self._remove = events.subscribe(self.on_event)

    def begin(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done = stage, total, 0
        if self.progress:
            self.progress(stage, 0, total)

    def on_event(self, event: Event) -> None:
        """Count a call answered (sent, or reused from the store); one the budget refused is not done
        (after a budget stop the bar read `keywords 15/15` where 7 had been sent)."""
        if isinstance(event, CallsResolved) and event.source == "budget":
            return
        if isinstance(event, (UsageUpdated, CallsResolved)) and event.run_id == self.run_id:
            self.done += event.count if isinstance(event, CallsResolved) else 1  # (answers reused, sent)
            if self.progress:
                self.progress(self.stage, min(self.done, self.total), self.total)

    def close(self) -> None:
        self._remove()


async def aprofile(pool: Pool, dataset: Dataset, *, grader: str | Grader = "auto",
                   keywords: KeywordConfig | None = None, aggregation_items: int | None = None, seed: int = 0,
                   executor: Executor | None = None, progress: Progress | None = None,
                   budget: Budget | None = None, matcher: SkillMatcher | None = None,
                   merge_similarity: float | None = None, cache: ResponseCache | None = None,
                   on_stop: Callable[[ProfilingSpent], None] | None = None) -> ProfilingReport:
    """Profile every agent of ``pool`` on ``dataset``. See the module docstring for the method.

    ``aggregation_items`` caps the aggregation benchmark (None: every usable item; 0: no benchmark).
    Keyword variants are merged into canonical skills (``orchestra.variants``) by name similarity,
    with ``matcher`` (an embedding matcher compares embeddings; default lexical) and at
    ``merge_similarity`` (1 merges nothing). ``cache`` records every answer as it comes, and
    answers an identical call again (the requests are made the same way each time: ``RunStore.cache``
    with a namespace of its own lets an interrupted profile go on).

    Raises ``ProfilingIncomplete`` after a stage in which a call failed (an unanswered question is
    not a wrong answer), and ``ConfigError`` before any call for a grader that could never grade an
    item correct. ``on_stop`` is given the profile's spending (``ProfilingSpent``, read when asked:
    requests cancelled in flight count once the event loop has ended) when it ends without a report
    (cancelled, a call failed, any other error), before the exception goes on.
    """
    grade = get_grader(grader)
    check_grader(grade, dataset.items, dataset.path)
    executor = executor or Executor()
    ledger = RunLedger.create("profile", budget or Budget(max_calls=None, max_cost_usd=None, max_tokens=None),
                              cache=cache)
    counter = _Counter(executor.events, ledger.run_id, progress)
    try:
        failed: list[tuple[str, Exception]] = []
        item_keywords = await _keywords(pool, dataset.items, executor, ledger, keywords, seed, counter, failed)
        _stop_if_failed(failed, counter)
        answers = await _answers(pool, dataset.items, executor, ledger, seed, counter)
        failed += [(f"agent {name} on item {item}", outcome) for name, outcomes in answers.items()
                   for item, outcome in outcomes.items() if isinstance(outcome, Exception)]
        _stop_if_failed(failed, counter)
        correct = {a.name: {item.id: _ok(answers[a.name][item.id], item, grade) for item in dataset.items}
                   for a in pool.agents}
        alike = answered_alike(answers, dataset.items, grade)
        scores = {a.name: _profile(correct[a.name], item_keywords) for a in pool.agents}
        competence = global_competence({a: sum(s.values()) for a, s in scores.items()})
        vocabulary = await merge_variants(item_keywords, correct, matcher=matcher, threshold=merge_similarity)
        canonical = {item: [vocabulary.canonical(k) for k in words] for item, words in item_keywords.items()}
        bench = _aggregation_set(dataset.items, answers, correct, aggregation_items, seed)
        aggregation = await _aggregation_scores(pool, bench, executor, ledger, grade, seed, counter, canonical,
                                                failed)
        _stop_if_failed(failed, counter)
    except BaseException:
        if on_stop is not None:
            on_stop(ProfilingSpent(ledger))
        raise
    finally:
        counter.close()
    keyword_model = model_id(pool.keyword_model) if pool.keyword_model else ""
    prompts = {name: template_hash(name) for name in ("keywords.j2", "expert.j2", "aggregator.j2")}
    profiles = {}
    for agent in pool.agents:
        provenance = Provenance(dataset=Path(dataset.path).name, dataset_sha256=dataset.sha256,
                                items=len(dataset), model=model_id(agent.model), endpoint=model_endpoint(agent.model),
                                persona_sha256=persona_sha256(agent.persona),
                                sampling={"temperature": agent.temperature, "max_tokens": agent.max_tokens},
                                keyword_model=keyword_model,
                                grader=grade.name, prompt_sha256=prompts, seed=seed)
        accuracy = sum(correct[agent.name].values()) / len(dataset)
        measured = aggregation.get(agent.name)
        counts = pooled_counts(item_keywords, correct[agent.name], vocabulary)
        profiles[agent.name] = SkillProfile(
            agent=agent.name, skills=scores[agent.name], accuracy=accuracy, competence=competence[agent.name],
            aggregation_score=measured.score if measured else None,
            aggregation_items=measured.items if measured else None,
            aggregation_stderr=measured.stderr if measured else None,
            aggregation_skills=measured.skills if measured else {},
            aliases={k: v for k, v in vocabulary.aliases.items() if k != v}, skill_counts=counts,
            estimates=skill_estimates(counts, accuracy), answer_tokens=mean_tokens(answers[agent.name].values()),
            aggregation_tokens=measured.tokens if measured else None, provenance=provenance)
    spent = ProfilingSpent(ledger)
    return ProfilingReport(profiles=profiles, item_keywords=item_keywords, correct=correct,
                           aggregation_items=len(bench), vocabulary=vocabulary, reused=spent.reused,
                           calls=spent.calls, usage=spent.usage, answered_alike=alike)


def build_profiles(pool: Pool, dataset: Dataset, **options: object) -> ProfilingReport:
    """Profile a pool (blocking). See ``aprofile``."""
    return run_sync(aprofile(pool, dataset, **options))  # type: ignore[arg-type]


def save_profiles(report: ProfilingReport, directory: str | Path) -> list[Path]:
    """Write each profile as ``<directory>/<agent>.json``."""
    report.written = [profile.save(directory) for profile in report.profiles.values()]
    return report.written


def mean_tokens(outcomes: Iterable[ChatResult | Exception]) -> tuple[float, float] | None:
    """The mean (prompt, completion) tokens of the answered calls (None: none answered)."""
    usages = [o.usage for o in outcomes if not isinstance(o, Exception)]
    if not usages:
        return None
    return (round(sum(u.prompt_tokens for u in usages) / len(usages), 1),
            round(sum(u.completion_tokens for u in usages) / len(usages), 1))


def answered_alike(answers: dict[str, dict[str, ChatResult | Exception]], items: Sequence[Item],
                   grade: Grader) -> list[tuple[str, str, int]]:
    """Pairs of agents whose final answers (as ``grade`` reads them) were the same on every item, at
    least ``ALIKE_MIN_ITEMS``, wrong on ``ALIKE_MIN_WRONG`` of them, with the count; each pair is warned
    of. Recruiting takes their answers as independent, so a team of both counts one expert twice and its
    expected accuracy is overstated. (Agents right on every item agree whatever they are: not named.)"""
    if len(items) < ALIKE_MIN_ITEMS:
        return []
    final = {agent: [_final(outcomes[item.id], item, grade) for item in items] for agent, outcomes in answers.items()}
    wrong = {agent: sum(not _ok(outcomes[item.id], item, grade) for item in items)
             for agent, outcomes in answers.items()}
    pairs = [(first, second, len(items)) for first, second in itertools.combinations(final, 2)
             if final[first] == final[second] and wrong[first] >= ALIKE_MIN_WRONG]
    for first, second, count in pairs:
        warnings.warn(f"{first} and {second} answered all {count} items alike: a team of both counts one expert twice "
                      "(expected accuracy overstated); keep one of them in the pool", UserWarning, stacklevel=3)
    return pairs


def _final(outcome: ChatResult | Exception, item: Item, grade: Grader) -> str | None:
    """The final answer in ``outcome`` as ``grade`` reads it (its text where it reads none; None: it failed)."""
    if isinstance(outcome, Exception):
        return None
    return grade.extract(outcome.text, item) or outcome.text.strip()


def _ok(outcome: ChatResult | Exception, item: Item, grade: Grader) -> bool:
    return not isinstance(outcome, Exception) and grade.grade(outcome.text, item)


def _profile(correct: dict[str, bool], item_keywords: dict[str, list[str]]) -> dict[str, int]:
    scores: Counter[str] = Counter()
    for item_id, ok in correct.items():
        for keyword in item_keywords[item_id]:
            scores[keyword] += 1 if ok else -1
    return dict(scores)


def _stop_if_failed(failed: list[tuple[str, Exception]], counter: _Counter) -> None:
    """Raise ``ProfilingIncomplete`` if a call of the stage failed: a question not answered (an
    endpoint down, a key refused) must not count as a wrong answer in anyone's profile."""
    if failed:
        what, error = failed[0]
        refused = sum(isinstance(e, BudgetExceeded) for _, e in failed)  # (never sent: they did not fail)
        how = (f"its budget left {len(failed)} of its calls unsent" if refused == len(failed) else
               f"{len(failed)} of its calls failed" + (f", {refused} of them left unsent by its budget" if refused
                                                       else ""))
        raise ProfilingIncomplete(f"profiling stopped after its {counter.stage} stage: {how} (first: {what}: {error}); "
                                  "no profiles were written", error)


async def _keywords(pool: Pool, items: Sequence[Item], executor: Executor, ledger: RunLedger,
                    config: KeywordConfig | None, seed: int, counter: _Counter,
                    failed: list[tuple[str, Exception]]) -> dict[str, list[str]]:
    extractor = SkillExtractor(config)
    model = pool.keyword_model
    assert model is not None  # a Pool always has one (its planner's, by default)
    counter.begin("keywords", len(items) * extractor.config.samples)

    async def one(item: Item) -> list[str]:
        requests = extractor.requests(item.prompt(), seed=seed)  # (the text a run of the item extracts from)
        outcomes = await executor.call(ledger, [(model, r) for r in requests], purpose="keywords")
        # an answer that is no valid JSON was still answered: its text is read as a run reads it (the
        # paper's "Keywords: a, b"); one such sample stopped the whole profile, --resume included
        failed.extend((f"the keywords of item {item.id}", o) for o in outcomes
                      if isinstance(o, Exception) and not isinstance(o, InvalidOutput))
        return extractor.combine(outcomes)

    results = await _gather(executor, [one(item) for item in items])
    return {item.id: keywords for item, keywords in zip(items, results)}


async def _answers(pool: Pool, items: Sequence[Item], executor: Executor, ledger: RunLedger, seed: int,
                   counter: _Counter) -> dict[str, dict[str, ChatResult | Exception]]:
    counter.begin("answers", len(items) * len(pool.agents))
    prompts = [expert_prompt(item) for item in items]

    async def one(agent: Agent) -> list[ChatResult | Exception]:
        calls = [(agent.model, agent.request(prompt, seed=seed)) for prompt in prompts]
        return await executor.call(ledger, calls, purpose="profile")

    results = await _gather(executor, [one(agent) for agent in pool.agents])
    return {agent.name: {item.id: outcome for item, outcome in zip(items, outcomes)}
            for agent, outcomes in zip(pool.agents, results)}


@dataclass(frozen=True)
class _AggregationItem:
    item: Item
    responses: tuple[str, ...]


def _aggregation_set(items: Sequence[Item], answers: dict[str, dict[str, ChatResult | Exception]],
                     correct: dict[str, dict[str, bool]], limit: int | None, seed: int) -> list[_AggregationItem]:
    """Items with one correct and two incorrect traces from profiling, seeded and shuffled (all, or ``limit``)."""
    rng = random.Random(seed)
    chosen = []
    for item in items:
        right = [answers[a][item.id] for a in answers if correct[a][item.id]]
        wrong = [answers[a][item.id] for a in answers if not correct[a][item.id]
                 and not isinstance(answers[a][item.id], Exception)]
        if not right or len(wrong) < 2:
            continue
        traces = [rng.choice(right).text, *(w.text for w in rng.sample(wrong, 2))]  # type: ignore[union-attr]
        rng.shuffle(traces)
        chosen.append(_AggregationItem(item, tuple(traces)))
    rng.shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


@dataclass(frozen=True)
class AggregationResult:
    """One agent's aggregation benchmark: accuracy, item count, standard error, and per-keyword counts."""

    score: float
    items: int
    stderr: float
    skills: dict[str, tuple[int, int]]
    tokens: tuple[float, float] | None = None

    @classmethod
    def from_grades(cls, grades: Sequence[bool], keywords: Sequence[Sequence[str]],
                    tokens: tuple[float, float] | None = None) -> AggregationResult:
        """Accuracy p over n graded items, its standard error, and (correct, items) per keyword.

        The error is Agresti-Coull's, ``sqrt(q(1-q)/(n+4))`` with ``q = (correct+2)/(n+4)``: the plain
        ``sqrt(p(1-p)/n)`` is 0 for a perfect (or null) score, so one lucky item read as certain
        (``1.00 ±0.00``) and won the aggregator's choice over a long, strong record; this one is
        0.22 there, and near ``sqrt(p(1-p)/n)`` once n is large."""
        n = len(grades)
        p = sum(grades) / n
        q = (sum(grades) + 2) / (n + 4)
        per_skill: dict[str, list[int]] = {}
        for ok, words in zip(grades, keywords):
            for word in dict.fromkeys(words):
                counts = per_skill.setdefault(word, [0, 0])
                counts[0] += ok
                counts[1] += 1
        return cls(score=p, items=n, stderr=math.sqrt(q * (1 - q) / (n + 4)),
                   skills={word: (c, t) for word, (c, t) in per_skill.items()}, tokens=tokens)


async def _aggregation_scores(pool: Pool, bench: list[_AggregationItem], executor: Executor, ledger: RunLedger,
                              grade: Grader, seed: int, counter: _Counter, item_keywords: dict[str, list[str]],
                              failed: list[tuple[str, Exception]]) -> dict[str, AggregationResult]:
    if not bench:
        return {}
    counter.begin("aggregation", len(bench) * len(pool.agents))
    prompts = []
    for entry in bench:
        question = entry.item.prompt()
        responses = [Response(agent="", text=t) for t in entry.responses]
        prompts.append(synthesize_prompt(question, question, responses, answer_format(entry.item)))

    keywords = [item_keywords.get(e.item.id, []) for e in bench]

    async def one(agent: Agent) -> AggregationResult:
        calls = [(agent.model, agent.request(prompt, seed=seed)) for prompt in prompts]
        outcomes = await executor.call(ledger, calls, purpose="aggregation-benchmark")
        failed.extend((f"agent {agent.name} aggregating item {e.item.id}", o) for o, e in zip(outcomes, bench)
                      if isinstance(o, Exception))
        return AggregationResult.from_grades([_ok(o, e.item, grade) for o, e in zip(outcomes, bench)], keywords,
                                             mean_tokens(outcomes))

    scores = await _gather(executor, [one(agent) for agent in pool.agents])
    return {agent.name: score for agent, score in zip(pool.agents, scores)}


async def _gather(executor: Executor, coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines as managed tasks together, so their calls share waves."""
    return list(await asyncio.gather(*(executor.run_task(c) for c in coros)))
