"""Simulated expert pools with known per-skill accuracy: check recruiting without any LLM.

Each simulated agent answers an item correctly with its known accuracy on the item's skill
(decided by a seeded hash, so runs repeat exactly). A simulated keyword LLM names the item's skill
plus a random distractor; a simulated aggregator follows the majority and, when the responses
disagree, recognises the right answer with its own aggregation skill (optionally per skill: an
aggregator that knows a topic recognises right answers on it more often). ``bench/recruit_sim.py`` and
the test suite use it; so can anyone tuning recruiting settings.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from orchestra.agents import Agent, Pool
from orchestra.datasets import Dataset, Item
from orchestra.models.types import ChatRequest
from orchestra.testing.doubles import FunctionModel

SKILLS = ("algebra", "geometry", "genetics", "organic chemistry", "mechanics", "european history",
          "python programming", "microeconomics")
DISTRACTORS = ("reasoning", "analysis", "facts", "problem solving", "knowledge", "logic", "science", "math",
               "definitions", "calculation", "memory", "reading", "critical thinking", "estimation", "research",
               "terminology", "comparison", "inference", "evidence", "concepts", "theory", "methods", "context",
               "details")
_QUESTION = re.compile(r"Case (\d+) \(([a-z ]+)\): what is the code")
_ANSWER = re.compile(r"answer is (-?\d+)", re.IGNORECASE)


def _uniform(*parts: object) -> float:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class SimulatedPool:
    """Agents with known accuracy per skill, and the items to test them on.

    ``aggregation`` is each agent's chance to pick the right answer out of disagreeing responses,
    on average over the skills; ``aggregation_by_skill``, when set, is that chance per skill.
    """

    skills: tuple[str, ...]
    accuracy: dict[str, dict[str, float]]
    aggregation: dict[str, float]
    seed: int = 0
    aggregation_by_skill: dict[str, dict[str, float]] | None = None
    prices: dict[str, tuple[float, float]] | None = None
    """agent -> USD per million (input, output) tokens (None: free)."""
    variants: dict[str, tuple[str, ...]] | None = None
    """skill -> the names the keyword LLM uses for it, one picked at random per answer."""
    omit_rate: float = 0.0
    """How often a keyword answer names only a distractor, not the item's skill."""

    def aggregation_skill(self, agent: str, skill: str) -> float:
        """``agent``'s chance to recognise the right answer among disagreeing responses on ``skill``."""
        if self.aggregation_by_skill is not None:
            return self.aggregation_by_skill[agent][skill]
        return self.aggregation[agent]

    def best_aggregator(self, skill: str | None = None) -> str:
        """The truly best aggregator, overall or on one skill."""
        if skill is None:
            return max(self.agents, key=lambda a: self.aggregation[a])
        return max(self.agents, key=lambda a: self.aggregation_skill(a, skill))

    @property
    def agents(self) -> list[str]:
        """Agent names."""
        return list(self.accuracy)

    def items(self, per_skill: int, *, offset: int = 0) -> Dataset:
        """``per_skill`` items for every skill; ``offset`` gives disjoint (held-out) sets."""
        rows = []
        for s, skill in enumerate(self.skills):
            for i in range(per_skill):
                code = 1000 * (s + 1) + offset + i
                rows.append(Item(id=f"{skill}-{offset + i}", question=f"Case {code} ({skill}): what is the code?",
                                 answer=str(code), category=skill))
        return Dataset.from_items(rows, name=f"simulated-{offset}")

    def answer(self, agent: str, prompt: str) -> str:
        """What ``agent`` says to an expert or aggregation prompt."""
        found = _QUESTION.search(prompt)
        if found is None:
            return "I cannot tell. The answer is 0"
        code, skill = int(found.group(1)), found.group(2)
        if "responses from several experts" in prompt:
            return self._aggregate(agent, prompt, code, skill)
        right = _uniform(self.seed, agent, code) < self.accuracy[agent][skill]
        value = code if right else code + 1 + self.agents.index(agent)
        return f"Working through case {code} with {skill} knowledge. The answer is {value}"

    def _aggregate(self, agent: str, prompt: str, code: int, skill: str) -> str:
        section = prompt.split("Responses:", 1)[-1]
        votes = [int(v) for v in _ANSWER.findall(section)]
        if not votes:
            return "The answer is 0"
        counts = {v: votes.count(v) for v in votes}
        top = max(counts.values())
        leaders = [v for v, n in counts.items() if n == top]
        if len(leaders) == 1 and top > 1:
            return f"The majority agrees. The answer is {leaders[0]}"
        chance = self.aggregation_skill(agent, skill)
        if code in votes and _uniform(self.seed, "aggregate", agent, code, len(votes)) < chance:
            return f"Checking each response, the correct one is clear. The answer is {code}"
        return f"The answer is {votes[0]}"

    def keywords(self, prompt: str, seed: int | None) -> dict[str, list[str]]:
        """The simulated keyword LLM: the item's skill plus one random distractor."""
        found = _QUESTION.search(prompt)
        skill = found.group(2) if found else "general"
        distractor = DISTRACTORS[int(_uniform(self.seed, prompt, seed) * len(DISTRACTORS))]
        if self.variants and skill in self.variants:
            names = self.variants[skill]
            skill = names[int(_uniform(self.seed, "variant", prompt, seed) * len(names))]
        if _uniform(self.seed, "omit", prompt, seed) < self.omit_rate:
            return {"keywords": [distractor]}
        return {"keywords": [skill, distractor]}

    def pool(self) -> Pool:
        """The agents as a ``Pool`` of ``FunctionModel``s, plus the keyword LLM as planner."""
        def expert(name: str) -> FunctionModel:
            return FunctionModel(lambda request: self.answer(name, request.prompt_text()), name=name,
                                 prices=(self.prices or {}).get(name))

        def keyword_llm(request: ChatRequest) -> dict[str, list[str]]:
            return self.keywords(request.prompt_text(), request.seed)

        agents = [Agent(name=name, model=expert(name)) for name in self.agents]

        return Pool(agents=agents, planner=FunctionModel(keyword_llm, name="keyword-llm"), name="simulated")

    def oracle_accuracy(self, items: Dataset) -> float:
        """Accuracy if every item went to the agent best at its skill."""
        return sum(max(self.accuracy[a][item.category or ""] for a in self.agents) for item in items) / len(items)

    def best_routing(self, skill: str, k: int = 2) -> tuple[list[str], str]:
        """The best achievable routing for a topic: its ``k`` truly best experts (the cheaper first
        among equals) and its truly best aggregator."""
        price = {a: sum((self.prices or {}).get(a, (0.0, 0.0))) for a in self.agents}
        experts = sorted(self.agents, key=lambda a: (-self.accuracy[a][skill], price[a], a))[:k]
        return experts, self.best_aggregator(skill)

    def best_routing_accuracy(self, items: Dataset, k: int = 2) -> float:
        """Accuracy when every item goes to its topic's best ``k`` experts and best aggregator,
        decided by the same simulated answers (the aggregator sees the synthesize prompt)."""
        from orchestra.pipeline.aggregation import Response, synthesize_prompt  # a test kit's helper only

        hits = 0
        for item in items:
            experts, aggregator = self.best_routing(item.category or "", k)
            texts = [self.answer(a, item.prompt()) for a in experts]
            values = {_ANSWER.findall(t)[-1] for t in texts}
            if len(texts) > 1 and len(values) > 1:
                prompt = synthesize_prompt(item.prompt(), item.prompt(),
                                           [Response(agent=a, text=t) for a, t in zip(experts, texts)], None)
                texts = [self.answer(aggregator, prompt)]
            hits += _ANSWER.findall(texts[0])[-1] == item.answer
        return hits / len(items)

    def expected_accuracy(self, agent: str, items: Dataset) -> float:
        """An agent's expected accuracy on ``items``."""
        return sum(self.accuracy[agent][item.category or ""] for item in items) / len(items)


def simulated_pool(n_agents: int = 6, skills: tuple[str, ...] = SKILLS, *, strong: float = 0.9,
                   mean: float = 0.5, spread: float = 0.2, seed: int = 0,
                   aggregation_levels: Sequence[float] | None = None,
                   topical_aggregation: float = 0.0) -> SimulatedPool:
    """Agents equally good overall, each the best at different skills.

    Agent ``i`` has accuracy ``strong`` on skills ``i``, ``i + n_agents``...; its other skills
    scatter (seeded, by up to ``spread``) around the level that makes its mean accuracy ``mean``.
    So no agent is best overall, and only per-item routing can reach the per-skill oracle.

    Aggregation skill is seeded at random in [0.3, 0.9], or ``aggregation_levels`` handed out to the
    agents in a seeded order (e.g. 0.07 apart). With ``topical_aggregation`` w > 0, an agent's
    aggregation skill on a topic is ``(1 - w) · level + w · accuracy on the topic``.
    """
    accuracy: dict[str, dict[str, float]] = {}
    aggregation: dict[str, float] = {}
    for a in range(n_agents):
        mine = [skill for s, skill in enumerate(skills) if s % n_agents == a]
        others = [skill for skill in skills if skill not in mine]
        level = (mean * len(skills) - strong * len(mine)) / max(1, len(others))
        jitter = [spread * (_uniform(seed, a, skill) - 0.5) for skill in others]
        offset = sum(jitter) / max(1, len(jitter))
        table = {skill: strong for skill in mine}
        table.update({skill: round(min(0.95, max(0.05, level + j - offset)), 3) for skill, j in zip(others, jitter)})
        name = f"expert{a}"
        accuracy[name] = {skill: table[skill] for skill in skills}
        aggregation[name] = round(0.3 + 0.6 * _uniform(seed, "aggregation", a), 3)
    if aggregation_levels is not None:
        if len(aggregation_levels) != n_agents:
            raise ValueError("aggregation_levels needs one level per agent")
        order = sorted(aggregation, key=lambda name: _uniform(seed, "aggregation order", name))
        aggregation = {name: aggregation_levels[order.index(name)] for name in aggregation}
    by_skill = None
    if topical_aggregation:
        w = topical_aggregation
        by_skill = {name: {skill: round((1 - w) * aggregation[name] + w * accuracy[name][skill], 4)
                           for skill in skills} for name in aggregation}
        aggregation = {name: round(sum(table.values()) / len(table), 4) for name, table in by_skill.items()}
    return SimulatedPool(skills=tuple(skills), accuracy=accuracy, aggregation=aggregation, seed=seed,
                         aggregation_by_skill=by_skill)


#: each topic's names in the keyword LLM's answers (all within the keyword length limit)
VARIANTS: dict[str, tuple[str, ...]] = {
    "algebra": ("algebra", "basic algebra", "algebra problems"),
    "geometry": ("geometry", "plane geometry", "geometry proofs"),
    "genetics": ("genetics", "genetics problems", "human genetics"),
    "organic chemistry": ("organic chemistry", "organic chem", "organic reactions"),
    "mechanics": ("mechanics", "classical mechanics", "mechanics problems"),
    "european history": ("european history", "history of europe", "europe history"),
    "python programming": ("python programming", "python coding", "python code"),
    "microeconomics": ("microeconomics", "micro economics", "microeconomic theory"),
}


def specialist_pool(*, seed: int = 0, omit_rate: float = 0.1) -> SimulatedPool:
    """A market of experts: 10 cheap specialists and 6 expensive generalists over 8 topics.

    Specialists ``spec0``-``spec9`` answer 0.9 on their one or two topics (every topic has two)
    and 0.2-0.35 elsewhere, at $0.10/$0.40 per million tokens. Generalists ``gen0``-``gen5``
    answer 0.70 down to 0.55 everywhere (seeded ±0.03 per topic) and cost 50x down to 10x a
    specialist; their aggregation skill ranges from 0.90 (``gen2``, 20x) down, a specialist's is
    0.35 (0.75 on its own topics). The keyword LLM names each topic by one of three variants
    (``VARIANTS``) plus a distractor, and in ``omit_rate`` of its answers only the distractor.
    """
    skills = tuple(VARIANTS)
    topics = {f"spec{i}": {skills[i]} for i in range(8)}
    for i in range(6):
        topics[f"spec{i}"].add(skills[(i + 4) % 8])
    topics["spec8"], topics["spec9"] = {skills[2]}, {skills[3]}
    accuracy: dict[str, dict[str, float]] = {}
    by_skill: dict[str, dict[str, float]] = {}
    prices: dict[str, tuple[float, float]] = {}
    for name, own in topics.items():
        accuracy[name] = {s: 0.9 if s in own else round(0.2 + 0.15 * _uniform(seed, name, s), 3) for s in skills}
        by_skill[name] = {s: 0.75 if s in own else 0.35 for s in skills}
        prices[name] = (0.10, 0.40)
    levels = (0.70, 0.67, 0.64, 0.61, 0.58, 0.55)
    multiples = (50, 40, 20, 30, 15, 10)
    recognition = (0.70, 0.75, 0.90, 0.65, 0.60, 0.50)
    for g in range(6):
        name = f"gen{g}"
        accuracy[name] = {s: round(levels[g] + 0.06 * (_uniform(seed, name, s) - 0.5), 3) for s in skills}
        by_skill[name] = {s: recognition[g] for s in skills}
        prices[name] = (0.10 * multiples[g], 0.40 * multiples[g])
    aggregation = {name: round(sum(table.values()) / len(table), 4) for name, table in by_skill.items()}
    return SimulatedPool(skills=skills, accuracy=accuracy, aggregation=aggregation, seed=seed,
                         aggregation_by_skill=by_skill, prices=prices, variants=VARIANTS, omit_rate=omit_rate)
