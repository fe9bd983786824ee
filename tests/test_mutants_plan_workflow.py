"""Behaviour of plans, DAGs, workflows, data sets and evaluations that a mutation run found unpinned.

Each test pins one behaviour a user depends on; only model answers are scripted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from helpers import kind_of, scripted_pool

from orchestra import Agent, Orchestra, Pool
from orchestra.dag import Dag
from orchestra.datasets import Dataset, Item, load_dataset
from orchestra.errors import ConfigError, DatasetError
from orchestra.evaluate import Tally, aevaluate
from orchestra.grading import get_grader
from orchestra.models import FunctionModel
from orchestra.plan import Plan, PlanInvalid, parse_plan, plan_schema
from orchestra.result import NodeTrace, PlanTrace, RunResult, RunUsage
from orchestra.settings import Settings
from orchestra.workflow import Workflow, parse_assignments

# --- plans ---------------------------------------------------------------------------------------


def test_parse_plan_names_the_first_problem_and_where_it_is() -> None:
    """What goes back to the planner on repair: the first schema problem, at its path ("plan" for the whole)."""
    with pytest.raises(PlanInvalid) as raised:
        parse_plan({"subtasks": [{"id": "bad id!", "instruction": ""}]})  # two problems: the id comes first
    assert str(raised.value).startswith("subtasks.0.id: String should match pattern")
    with pytest.raises(PlanInvalid) as raised:
        parse_plan(["not", "a", "plan"])
    assert str(raised.value) == "plan: Input should be a valid dictionary or instance of Plan"
    with pytest.raises(PlanInvalid, match="^subtasks: List should have at least 1 item"):
        parse_plan({"subtasks": []})


def test_plan_schema_bounds_what_a_constrained_planner_may_write() -> None:
    """The planner's JSON schema carries the node limit and the string and list bounds, and leaves
    the model's own schema untouched."""
    before = json.dumps(Plan.model_json_schema(), sort_keys=True)
    schema = plan_schema(4)
    assert schema["properties"]["subtasks"]["maxItems"] == 4
    subtask = schema["$defs"]["Subtask"]["properties"]
    assert subtask["instruction"]["maxLength"] == 240
    assert subtask["depends_on"]["maxItems"] == 4 and subtask["depends_on"]["items"]["maxLength"] == 40
    assert subtask["skills"]["maxItems"] == 3 and subtask["skills"]["items"]["maxLength"] == 30
    assert json.dumps(Plan.model_json_schema(), sort_keys=True) == before


def test_a_dags_order_is_a_copy_its_caller_may_change() -> None:
    """``order()`` is cached, but what it returns is the caller's: changing it does not change the next order."""
    graph = Dag({"a": [], "b": ["a"], "c": ["b"]})
    first = graph.order()
    first.reverse()
    first.append("ghost")
    assert graph.order() == ["a", "b", "c"]


# --- data sets -----------------------------------------------------------------------------------


def _item(answer: object, choices: list[str] | None = None, **fields: object) -> Item:
    return Item.model_validate({"id": "1", "question": "Which one?", "answer": answer, "choices": choices, **fields})


@pytest.mark.parametrize("answer, choices", [
    ("J", [f"c{i}" for i in range(10)]),  # ten choices: all ten letters are answers
    ("(b)", ["x", "y"]),  # a letter in brackets, any case
    (" b ", ["x", "y"]),
    ("paris", ["Paris", "Rome"]),  # the text of a choice, any case
])
def test_a_multiple_choice_answer_may_be_any_of_its_letters_or_texts(answer: str, choices: list[str]) -> None:
    """A reference answer is a letter of its choices (brackets and case aside) or one choice's text."""
    assert _item(answer, choices).choices == tuple(choices)


def test_a_multiple_choice_answer_that_is_no_single_letter_is_refused_with_a_plain_message(tmp_path: Path) -> None:
    """"AB" is not a letter of A-C (though a substring of the letters), and the message reads as a sentence."""
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "q", "answer": "AB", "choices": ["x", "y", "z"]}) + "\n")
    with pytest.raises(DatasetError) as raised:
        load_dataset(path)
    assert str(raised.value) == (f"{path}:1: field 'choices': the answer 'AB' is neither a letter of its 3 choices "
                                 "(A-C) nor the text of one")


@pytest.mark.parametrize("row, problem", [
    # an eleventh choice is named by its number (there is no letter for it)
    ({"answer": "A", "choices": [f"c{i}" for i in range(10)] + [" "]}, "field 'choices': choice 11 is empty"),
    # a blank answer is what is named, even with choices to check it against
    ({"answer": " ", "choices": ["x", "y"]},
     "field 'answer': the answer is empty: no reply could be graded correct against it"),
    # numbers are written as text, but true/false are not ids or answers
    ({"answer": True}, "field 'answer': Input should be a valid string"),
    ({"answer": "1", "id": True}, "field 'id': Input should be a valid string"),
])
def test_a_bad_row_is_one_message_naming_its_field(tmp_path: Path, row: dict[str, object], problem: str) -> None:
    """Each bad row is a ``DatasetError`` naming file, line and field, never a crash inside validation."""
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "q", **row}) + "\n")
    with pytest.raises(DatasetError) as raised:
        load_dataset(path)
    assert str(raised.value) == f"{path}:1: {problem}"


# --- workflows -----------------------------------------------------------------------------------


@pytest.fixture
def pool() -> Pool:
    return Pool(agents=[Agent(name="writer", model=FunctionModel(lambda request: "The answer is 1", name="m"))])


def load(tmp_path: Path, pool: Pool, text: str, name: str = "wf.yaml") -> Workflow:
    path = tmp_path / name
    path.write_text(text)
    return Workflow.load(path, pool=pool)


def test_a_step_id_longer_than_a_plan_allows_is_refused_when_the_workflow_loads(tmp_path: Path, pool: Pool) -> None:
    """Step ids follow the plan's id rule (at most 40 characters): a longer one is refused at load,
    naming its line, not when the run turns the steps into a plan."""
    longest = "a" * 40
    assert load(tmp_path, pool, f"steps:\n  - id: {longest}\n    prompt: hi\n").plan().subtasks[0].id == longest
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, pool, f"steps:\n  - id: {longest}b\n    prompt: hi\n")
    assert f"wf.yaml:2:9: steps.{longest}b.id: String should match pattern" in str(raised.value)


def test_a_duplicate_step_id_is_refused_where_it_is_repeated(tmp_path: Path, pool: Pool) -> None:
    """Two steps with one id are refused at load, naming the second one's line."""
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, pool, "steps:\n  - id: a\n    prompt: hi\n  - id: a\n    prompt: ho\n")
    assert str(raised.value) == f"{tmp_path / 'wf.yaml'}:4:9: duplicate step id 'a'"


def test_a_step_may_read_any_step_it_needs_through_others(tmp_path: Path, pool: Pool) -> None:
    """``needs`` is transitive for templates: c needs b, b needs a, so c may read steps.a (a has
    finished before c starts); a step it does not reach is still refused."""
    chain = ("steps:\n  - id: a\n    prompt: hi\n  - id: b\n    needs: [a]\n    prompt: '{{ steps.a.output }}'\n"
             "  - id: c\n    needs: [b]\n    prompt: '{{ steps.a.output }} and {{ steps.b.output }}'\n")
    assert [s.id for s in load(tmp_path, pool, chain).plan().subtasks] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="step 'a' uses steps.c but does not need 'c'"):
        load(tmp_path, pool, chain.replace("prompt: hi", "prompt: '{{ steps.c.output }}'"))


def test_a_step_reading_itself_is_told_so_rather_than_to_need_itself(tmp_path: Path, pool: Pool) -> None:
    """'add it to needs' would make a cycle of one step."""
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, pool, "steps:\n  - id: a\n    prompt: '{{ steps.a.output }}'\n")
    assert str(raised.value).endswith("step 'a' uses its own output (steps.a); a step can read only the steps it "
                                      "needs, which run before it")


def test_steps_that_read_only_what_they_need_directly_are_checked_without_walking_the_graph(
        tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of n steps, each reading the one before: working out every step's ancestors made
    validation quadratic (2,000 steps took 15 s); they are worked out only for an indirect read."""
    from orchestra.dag import Dag

    walked: list[str] = []
    ancestors = Dag.ancestors
    monkeypatch.setattr(Dag, "ancestors", lambda self, node: walked.append(node) or ancestors(self, node))
    steps = "".join(f"  - id: s{i}\n    needs: [s{i - 1}]\n    prompt: '{{{{ steps.s{i - 1}.output }}}}'\n"
                    for i in range(1, 50))
    load(tmp_path, pool, "steps:\n  - id: s0\n    prompt: hi\n" + steps)
    assert walked == []
    load(tmp_path, pool, "steps:\n  - id: s0\n    prompt: hi\n" + steps.replace("'{{ steps.s48.output }}'",
                                                                              "'{{ steps.s0.output }} {{ steps.s1.output }}'"))
    assert walked == ["s49"]  # (once for the step, not once per read)


def test_an_input_default_must_have_its_type_and_true_is_no_integer(tmp_path: Path, pool: Pool) -> None:
    """YAML's true is a boolean: it is not accepted as an integer (or number) input's default."""
    for kind in ("integer", "number"):
        with pytest.raises(ConfigError, match=f"input 'n': default True is not of type {kind}"):
            load(tmp_path, pool, f"inputs:\n  n: {{type: {kind}, default: true}}\nsteps:\n  - id: a\n    prompt: hi\n")


def test_a_data_set_path_that_is_a_folder_is_refused_at_load(tmp_path: Path, pool: Pool) -> None:
    """A workflow's data set must be a file: a folder is named as such at load (validate), not at run."""
    (tmp_path / "data").mkdir()
    text = "inputs:\n  question: {type: string}\ndataset: {path: data}\nsteps:\n  - id: a\n    prompt: '{{ inputs.question }}'\n"
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, pool, text)
    assert str(raised.value) == (f"{tmp_path / 'wf.yaml'}:3:17: the data set {tmp_path / 'data'} is a folder; "
                                 "name its JSONL file")


def test_a_workflow_keeps_the_pools_seed_unless_it_sets_its_own(tmp_path: Path) -> None:
    """``seed:`` left out of a workflow is not its default 0: the pool's seed stands; one written (even 0) wins."""
    seeded = Pool(agents=[Agent(name="writer", model=FunctionModel(lambda request: "x", name="m"))],
                  settings=Settings(seed=5, k=2))
    steps = "steps:\n  - id: a\n    prompt: hi\n"
    assert (load(tmp_path, seeded, steps).settings().seed, load(tmp_path, seeded, steps).settings().k) == (5, 2)
    assert load(tmp_path, seeded, "seed: 7\nsettings: {k: 3}\n" + steps).settings().model_dump(
        include={"seed", "k"}) == {"seed": 7, "k": 3}
    assert load(tmp_path, seeded, "seed: 0\n" + steps).settings().seed == 0


FLOW = """\
inputs:
  n: {type: integer, default: 3}
  flag: {type: boolean}
steps:
  - id: a
    description: '  Draft it  '
    prompt: hi
  - id: b
    needs: [a]
    recruit: {skills: [writing, math]}
    prompt: |

      HUNDRED
      second line
  - id: c
    prompt: LONGER
"""


def test_inputs_given_as_none_are_not_given_and_text_converts_to_the_declared_type(tmp_path: Path,
                                                                                    pool: Pool) -> None:
    """None means "not given" (the default applies); command-line text converts to booleans by the
    listed words only (any other word is refused)."""
    flow = load(tmp_path, pool, FLOW.replace("HUNDRED", "x" * 100).replace("LONGER", "y" * 101))
    assert flow.resolve_inputs({"n": None, "flag": None}) == {"n": 3, "flag": None}
    for text, value in (("1", True), ("yes", True), ("TRUE", True), ("0", False), ("No", False), ("false", False),
                        ("on", True), ("Off", False), (" true ", True)):  # (YAML's on/off were refused)
        assert flow.resolve_inputs({"flag": text}) == {"n": 3, "flag": value}
    with pytest.raises(ConfigError, match="input 'flag' must be of type boolean, got 'maybe'"):
        flow.resolve_inputs({"flag": "maybe"})


def test_a_workflows_steps_become_a_plan_with_their_descriptions_and_skills(tmp_path: Path, pool: Pool) -> None:
    """Each step's subtask: its description (stripped), else its prompt's first line (cut past 100
    characters); its recruit skills; its needs. An unnamed workflow is named by its file's stem."""
    flow = load(tmp_path, pool, FLOW.replace("HUNDRED", "x" * 100).replace("LONGER", "y" * 101), name="flow.v2.yaml")
    plan = flow.plan()
    assert plan is not None
    assert [(s.id, s.instruction, s.depends_on, s.skills) for s in plan.subtasks] == [
        ("a", "Draft it", [], []), ("b", "x" * 100, ["a"], ["writing", "math"]), ("c", "y" * 97 + "...", [], [])]
    assert flow.name == "flow.v2" and flow.task({}) == "flow.v2"
    named = load(tmp_path, pool, "name: tides\ndescription: Explain tides.\nsteps:\n  - id: a\n    prompt: hi\n")
    assert named.name == "tides" and named.task({}) == "tides: Explain tides."


@pytest.mark.parametrize("pairs, problem", [
    (["=x"], "-i expects KEY=VALUE, got '=x'"),
    ([" =x"], "-i expects KEY=VALUE, got ' =x'"),
    (["k"], "-i expects KEY=VALUE, got 'k'"),
    (["k=1", " k=2"], "input 'k' is given twice (-i k=1 and -i k=2); give it once"),
])
def test_input_assignments_need_a_key_each_given_once(pairs: list[str], problem: str) -> None:
    """``-i KEY=VALUE``: a blank key, no ``=``, or a key given twice is refused, naming the pair."""
    with pytest.raises(ConfigError) as raised:
        parse_assignments(pairs)
    assert str(raised.value) == problem
    assert parse_assignments(["k=a=b", "m="]) == {"k": "a=b", "m": ""}


# --- evaluations ---------------------------------------------------------------------------------


def _finished(run_id: str, status: str = "done", answer: str | None = "The answer is 1",
              error: str | None = None) -> RunResult:
    return RunResult(run_id=run_id, task="t", status=status, answer=answer, error=error,  # type: ignore[arg-type]
                     plan=PlanTrace(nodes=[NodeTrace(id="answer", instruction="t", saved_calls=2)]),
                     usage=RunUsage(calls=3, requests=4, prompt_tokens=10, completion_tokens=5, cost_usd=0.25,
                                    skill_extraction_failures=1))


def test_a_report_lists_answers_categories_and_the_first_failure_in_data_set_order() -> None:
    """Runs finish in any order; the report reads in the data set's: answers by item, categories by
    their first item, and the failure named is that of the earliest failed item; totals add up every run."""
    items = [Item(id=f"q{i}", question="q", answer="1", category=c) for i, c in enumerate(["geo", "art", "geo", "art"])]
    tally = Tally(get_grader("auto"))
    for index in (0, 3, 2, 1):  # completion order
        failed = index in (3, 1)
        tally.add(index, items[index], _finished(f"r{index}", "failed" if failed else "done",
                                                 None if failed else "The answer is 1",
                                                 f"crash {index}" if failed else None))
    report = tally.report("vote", elapsed_s=0.0, model_loads={})
    assert [row["id"] for row in report.answers] == ["q0", "q1", "q2", "q3"]
    assert list(report.per_category) == ["geo", "art"]
    assert report.per_category == {"geo": {"items": 2, "accuracy": 1.0}, "art": {"items": 2, "accuracy": 0.0}}
    assert (report.failed, report.first_failure, report.failure_exit) == (2, "item q1 (failed): crash 1", 1)
    # what every run spent, failed ones included, and what confident teams saved
    assert (report.items, report.correct, report.accuracy) == (4, 2, 0.5)
    assert (report.calls, report.requests, report.prompt_tokens, report.completion_tokens) == (12, 16, 40, 20)
    assert (report.cost_usd, report.cost_per_correct_usd) == (1.0, 0.5)
    assert (report.skill_extraction_failures, report.saved_calls) == (4, 8)


def test_an_unfinished_run_counts_as_wrong_even_with_a_right_answer() -> None:
    """A partial run (its skill extraction failed) left a right answer: eval reported 1.000 "(0 of 1 finished;
    the rest count as wrong)"."""
    tally = Tally(get_grader("auto"))
    item = Item(id="q0", question="q", answer="1")
    tally.add(0, item, _finished("r0", "partial", "The answer is 1", "skill extraction failed"))
    tally.add(1, item, _finished("r1", "done", "The answer is 1"))
    report = tally.report("vote", elapsed_s=0.0, model_loads={})
    assert (report.items, report.correct, report.failed) == (2, 1, 1)
    assert [row["correct"] for row in report.answers] == [False, True]
    # the answer's own grade is shown apart: "wrong" and "not counted" read alike in an answers file
    assert [row["grade"] for row in report.answers] == [True, True]
    tally.add(2, item, _finished("r2", "failed", None, "every expert failed"))
    assert tally.report("vote", elapsed_s=0.0, model_loads={}).answers[-1]["grade"] is None


DATA = Dataset.from_items([{"id": f"q{i}", "question": f"What is {i} - {i} + 1?", "answer": "1"} for i in range(2)])


def test_a_method_is_named_by_what_ran_and_single_asks_one_expert(tmp_path: Path) -> None:
    """``vote`` with aggregation overridden to synthesize is what ``symbolic-moe`` is, and is named so;
    ``single`` asks one expert per item whatever the Orchestra's k."""
    pool, models = scripted_pool(3)
    orc = Orchestra(pool, k=3, store=False)
    assert asyncio.run(aevaluate(orc, DATA, method="vote", aggregate="synthesize")).method == "symbolic-moe"
    assert asyncio.run(aevaluate(orc, DATA, method="vote")).method == "vote"
    before = sum(kind_of(r) == "expert" for m in models.values() for r in m.requests)
    single = asyncio.run(aevaluate(orc, DATA, method="single"))
    assert single.method == "single" and single.correct == 2
    assert sum(kind_of(r) == "expert" for m in models.values() for r in m.requests) - before == 2


def test_answers_of_a_data_set_built_in_code_may_replace_an_earlier_answers_file(tmp_path: Path) -> None:
    """A data set built in code has no file the answers could overwrite: an earlier answers file is replaced
    (a file that is not one is refused)."""
    pool, _ = scripted_pool(1)
    output = tmp_path / "answers.jsonl"
    output.write_text("notes, not answers\n")
    with pytest.raises(ConfigError, match="exists and is not an earlier answers file"):
        asyncio.run(aevaluate(Orchestra(pool, k=1, store=False), DATA, output=output))
    output.write_text('{"id": "old", "category": null, "answer": "4", "correct": true, "status": "done", '
                      '"run_id": "r"}\n')
    report = asyncio.run(aevaluate(Orchestra(pool, k=1, store=False), DATA, output=output))
    assert report.items == 2
    assert sorted(json.loads(line)["id"] for line in output.read_text().splitlines()) == ["q0", "q1"]


def test_model_loads_count_only_this_evaluations_loads() -> None:
    """An Orchestra evaluating twice reports per evaluation the loads it made: none the second time
    (the model stayed loaded), not a zero entry per model."""
    model = FunctionModel(lambda request: "The answer is 1", name="m", heavy=True)
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)]), k=1, aggregate="none", plan=False, store=False)

    async def twice() -> tuple[dict[str, int], dict[str, int]]:
        first = await aevaluate(orc, DATA)
        second = await aevaluate(orc, DATA)
        return first.model_loads, second.model_loads

    assert asyncio.run(twice()) == ({"m": 1}, {})


def _store_runs(orchestra_home: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(orchestra_home / "runs.db") as db:
        return db.execute("SELECT id, json_extract(config, '$.spec.meta.item') FROM runs ORDER BY created, rowid").fetchall()


def test_resume_counts_each_items_latest_finished_run_and_skips_a_damaged_record(orchestra_home: Path) -> None:
    """Of several earlier evaluations that match, resume counts each item's latest run (no new call);
    a record it cannot read is passed over for the one before it, not a crash."""
    import sqlite3

    said = ["The answer is 2"]
    model = FunctionModel(lambda request: said[0], name="m")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=model)]), k=1, aggregate="none", plan=False)
    assert asyncio.run(aevaluate(orc, DATA)).correct == 0
    said[0] = "The answer is 1"
    assert asyncio.run(aevaluate(orc, DATA)).correct == 2
    said[0] = "The answer is 3"  # nothing may ask the model again
    asked = len(model.requests)
    resumed = asyncio.run(aevaluate(orc, DATA, resume=True))
    assert (resumed.items, resumed.correct, resumed.reused, resumed.resumed) == (2, 2, 2, 0)
    latest_q1 = [run_id for run_id, item in _store_runs(orchestra_home) if item == "q1"][-1]
    with sqlite3.connect(orchestra_home / "runs.db") as db:
        db.execute("UPDATE runs SET config = json_set(config, '$.spec.settings.k', 'many') WHERE id = ?", (latest_q1,))
    again = asyncio.run(aevaluate(orc, DATA, resume=True))
    assert (again.correct, again.reused) == (1, 2)  # q1 from the first evaluation, which answered 2
    assert [row["correct"] for row in again.answers] == [True, False] and len(model.requests) == asked


def test_an_evaluation_counts_the_nodes_its_aggregators_failed_and_votes_answered() -> None:
    """eval said nothing when every item's aggregator failed and a vote answered (ask and run warn)."""
    from orchestra.events import fell_back

    tally = Tally(get_grader("auto"))
    item = Item(id="q0", question="q", answer="1")
    voted = _finished("r0")
    voted.plan.nodes[0].recruitment = {"explanation": ["why", fell_back("judge", "HTTP 500")]}
    tally.add(0, item, voted)
    tally.add(1, item, _finished("r1"))
    assert tally.report("moa", elapsed_s=0.0, model_loads={}).voted_instead == 1
