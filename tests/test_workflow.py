"""YAML workflows: validation errors (one line, file:line), running, examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import AGGREGATE_MARK, FINAL_MARK, kind_of, plan_json, scripted_pool
from loopback_llm import LOCAL_AGENTS, ScriptedLLM, write_pool
from test_cli import cli

from orchestra import Agent, Orchestra, Pool
from orchestra.errors import ConfigError
from orchestra.models import ChatRequest, FunctionModel
from orchestra.settings import Settings
from orchestra.store import RunStore, default_store_path
from orchestra.testing import chat_handler
from orchestra.workflow import Workflow
from orchestra.workflow_run import orchestra_for, run_workflow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GOOD = """\
name: demo
pool:
  models:
    m: {type: openai, model: x, base_url: "http://127.0.0.1:9/v1", api_key_env: null}
  agents:
    - {name: writer, model: m}
    - {name: checker, model: m}
inputs:
  topic: {type: string, required: true}
  words: {type: integer, default: 50}
steps:
  - id: draft
    agent: writer
    prompt: "Write {{ inputs.words }} words on {{ inputs.topic }}."
  - id: review
    needs: [draft]
    recruit: {k: 2, skills: [writing]}
    prompt: |
      Review this draft:
      {{ steps.draft.output }}
final: "{{ steps.review.output }}"
"""


def reviewed(schema: str, final: str) -> str:
    """``GOOD`` with the review step's ``output:`` schema and the ``final`` template given."""
    return (GOOD.replace("    recruit: {k: 2, skills: [writing]}\n",
                         f"    recruit: {{k: 2, skills: [writing]}}\n    output: {schema}\n")
            .replace('final: "{{ steps.review.output }}"', f"final: {final}"))


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_name_given_twice_or_bound_by_a_loop_is_left_to_the_run(tmp_path: Path) -> None:
    """Only a name given one step (or the inputs) once is read as it: a loop's own name is its own."""
    for final in ("{% set r = steps.review %}{% for r in [1, 2] %}{{ r.real }}{% endfor %}",
                  "{% set r = steps.review %}{% set r = inputs %}{{ r.topic }}"):
        Workflow.load(write(tmp_path, GOOD.replace('final: "{{ steps.review.output }}"', f'final: "{final}"')))


def test_a_data_field_a_schema_leaves_open_validates(tmp_path: Path) -> None:
    """A field the schema does not list is refused only where the schema closes its properties."""
    for extra in ("additionalProperties: true", "additionalProperties: {}", "patternProperties: {'^x': {type: string}}",
                  "allOf: [{properties: {xtra: {type: string}}}]", "anyOf: [{required: [verdict]}]"):
        text = (GOOD.replace("    recruit: {k: 2, skills: [writing]}\n", "    recruit: {k: 2, skills: [writing]}\n"
                             f"    output: {{type: object, properties: {{verdict: {{type: string}}}}, {extra}}}\n")
                .replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.data.xtra }}"'))
        Workflow.load(write(tmp_path, text))


def test_good_workflow_validates(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = cli("validate", str(path))
    assert done.returncode == 0, done.stderr
    assert "ok (demo: 2 step(s)" in done.stdout
    # --json, as every other command has it (it was "No such option '--json'"); errors stay one line on stderr
    checked = cli("validate", str(path), "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout) == {
        "ok": True, "workflow": "demo", "file": str(path), "plan": None, "steps": ["draft", "review"],
        "pool": "pool", "agents": ["writer", "checker"], "dataset_items": None, "limit": None}
    path.write_text(GOOD.replace("agent: writer", "agent: poet"))
    refused = cli("validate", str(path), "--json")
    assert (refused.returncode, refused.stdout) == (2, "") and "names unknown agent 'poet'" in refused.stderr


def test_validate_takes_a_pool_as_run_does(tmp_path: Path) -> None:
    """``validate wf.yaml --pool other.yaml`` was "No such option '--pool'", though ``run`` takes it (and the
    README runs examples on another pool so): its agents are checked against that pool."""
    other = tmp_path / "other.yaml"
    other.write_text("name: other\nmodels:\n  m: {type: openai, model: x, base_url: 'http://127.0.0.1:9/v1', "
                     "api_key_env: null}\nagents:\n  - {name: writer, model: m}\n  - {name: judge, model: m}\n")
    path = write(tmp_path, GOOD)
    done = cli("validate", str(path), "--pool", str(other))
    assert done.returncode == 0 and "ok (demo: 2 step(s), pool other with 2 agents)" in done.stdout, done.stderr
    other.write_text(other.read_text().replace("name: writer", "name: poet"))
    refused = cli("validate", str(path), "--pool", str(other))
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: {path}:13:12: step 'draft' names unknown agent 'writer'; the pool has poet, judge")


def test_a_steps_skills_that_match_none_of_the_pools_are_refused(tmp_path: Path) -> None:
    """``skills: [underwater basket weaving]`` passed validate, and the step was recruited as if it named no skill,
    unsaid; a misspelling the matcher finds (writting), or one skill of several that matches, is kept."""
    write_pool(tmp_path, "http://127.0.0.1:9")  # (its agents' skills: history, arithmetic, writing)
    text = "pool: pool.yaml\nsteps:\n  - id: a\n    recruit: {k: 2, skills: [SKILLS]}\n    prompt: Write.\n"
    with pytest.raises(ConfigError, match=re.escape(
            "wf.yaml:4:29: step 'a': its skills (underwater basket weaving, knitting) match none of the pool's 3 "
            "skills (arithmetic, history, writing); fix them, or leave skills out to have them found from its "
            "prompt")):
        Workflow.load(write(tmp_path, text.replace("SKILLS", "underwater basket weaving, knitting")))
    for kept in ("writting", "underwater basket weaving, history"):
        Workflow.load(write(tmp_path, text.replace("SKILLS", kept)))
    embedding = "settings: {matcher: {type: embedding, model: e, base_url: 'http://127.0.0.1:9/v1'}}\n"
    Workflow.load(write(tmp_path, embedding + text.replace("SKILLS", "knitting")))  # (known when it is asked)
    # on another pool (run --pool), skills written for the workflow's own may all be missing
    Workflow.load(write(tmp_path, text.replace("SKILLS", "knitting")), pool=Pool.load(tmp_path / "pool.yaml"))


def test_a_workflow_pool_that_is_a_folder_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "pool: .\nsteps:\n  - {id: a, prompt: hi}\n")
    done = cli("validate", str(path))  # (it said "pool file not found")
    assert (done.returncode, done.stderr.strip()) == (2, f"error: {path}:1:7: {tmp_path} is a folder, not a pool file")


@pytest.mark.parametrize("broken, expected", [
    (GOOD.replace("    agent: writer\n", "    agent: poet\n"),
     "wf.yaml:13:12: step 'draft' names unknown agent 'poet'; the pool has writer, checker"),
    (GOOD.replace("{{ steps.draft.output }}", "{{ steps.drfat.output }}"),
     "wf.yaml:20: step 'review' references unknown step 'drfat'"),
    (GOOD.replace("  - id: draft\n", "  - id: draft\n    needs: [review]\n"),
     "wf.yaml:17:12: the steps' needs form a cycle: draft -> review -> draft"),
    (GOOD.replace("{{ inputs.topic }}", "{{ inputs.subject }}"),
     "wf.yaml:14:13: step 'draft' uses undeclared input 'subject'; declare it under inputs:"),
    (GOOD.replace("steps:\n  - id: draft", "steps:\n  - id: draft\n  bad indent: [", 1),
     "wf.yaml:13:3: invalid YAML: "),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.output }}'),
     # where the quote opens, not the end of the file where the parser noticed
     "wf.yaml:21:8: invalid YAML: a quoted scalar that starts here is never closed (found unexpected end of stream)"),
    (GOOD.replace("needs: [draft]", "needs: [drafts]"),
     "wf.yaml:16:13: step 'review' needs unknown step 'drafts'; steps: draft, review"),
    (GOOD.replace("needs: [draft]", "needs: [draft, draft]"),  # (accepted: a slip that hides another)
     "wf.yaml:16:20: step 'review' needs 'draft' twice; list it once"),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.output }"'),
     "wf.yaml:21:8: template syntax error: unexpected '}'"),
    # a misspelt filter (found as the template compiles: it was a traceback) and test (Jinja finds one only
    # when the test runs, after the steps before it were paid for)
    (GOOD.replace("{{ inputs.topic }}", "{{ inputs.topic | uper }}"),
     "wf.yaml:14:13: template syntax error: No filter named 'uper'."),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.output if steps is mapping and '
                  'steps.review is defnied }}"'),
     "wf.yaml:21:8: final uses the unknown template test 'defnied' (`is defnied`); tests: boolean, callable, "
     "defined, "),
    (GOOD.replace("    recruit: {k: 2, skills: [writing]}\n", "    recruit: {k: 0}\n"),
     "wf.yaml:17:18: steps.review.recruit.k: Input should be greater than or equal to 1"),
    (GOOD.replace("  words: {type: integer, default: 50}", "  words: {type: integer, default: fifty}"),
     "wf.yaml:10:35: input 'words': default 'fifty' is not of type integer"),
    (GOOD.replace("  topic: {type: string, required: true}", "  topic: {type: string, default: on}"),
     "wf.yaml:9:34: input 'topic': default True is not of type string (YAML reads the unquoted words on, off, yes, "
     "no, true and false as booleans: quote it, \"on\")"),
    (GOOD.replace("  topic: {type: string, required: true}", "  topic: {type: string, default: No}"),
     "wf.yaml:9:34: input 'topic': default False is not of type string (YAML reads the unquoted words on, off, yes, "
     "no, true and false as booleans: quote it, \"No\")"),  # (the word written: it said "on" whatever it was)
    # a number YAML 1.1 reads otherwise than -i does (010 was 8 as a default, 10 given): it ran as 8
    (GOOD.replace("  words: {type: integer, default: 50}", "  words: {type: integer, default: 010}"),
     "wf.yaml:10:35: input 'words': YAML reads the default 010 as 8, and -i words=010 as 10: write the number meant "
     "in decimal digits"),
    (GOOD.replace("  words: {type: integer, default: 50}", "  words: {type: number, default: 12:30}"),
     "wf.yaml:10:34: input 'words': YAML reads the default 12:30 as 750: write the number meant in decimal digits"),
    (GOOD.replace("  topic: {type: string, required: true}", "  topic: {type: string, default: 12:30}"),
     "wf.yaml:9:34: input 'topic': default 750 is not of type string (YAML read the unquoted value as a number: "
     "quote it to keep it as written)"),  # (YAML 1.1's base 60)
    # a name -i cannot give (validate said ok; run asked for -i =VALUE, which it refused)
    (GOOD.replace("  topic: {type: string, required: true}", '  "": {type: string, required: true}'),
     "wf.yaml:9:3: input '': an input's name is given as -i NAME=VALUE, so it is not blank, has no '=' and no spaces "
     "at its ends: rename it"),
    (GOOD.replace("  topic: {type: string, required: true}", '  "a=b": {type: string, required: true}'),
     "wf.yaml:9:3: input 'a=b': an input's name is given as -i NAME=VALUE"),
    # (Jinja's parser recurses per level: a RecursionError traceback, exit 1)
    (GOOD.replace("Write {{ inputs.words }} words", "Write {{ " + "(" * 100 + "1" + ")" * 100 + " }} words"),
     "wf.yaml:14:13: step 'draft': its template nests expressions or blocks too deeply for Jinja to read; flatten it"),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "' + "{% if true %}" * 400 + "x" + "{% endif %}" * 400
                  + '"'), "wf.yaml:21:8: final: its template nests expressions or blocks too deeply for Jinja to read; "
                          "flatten it"),
    # a setting too (budget max_calls: 010 stopped the run at 8 calls; 12:30 was 750, seed 0x1f 31)
    (GOOD.replace("    recruit: {k: 2, skills: [writing]}\n", "    recruit: {k: 010}\n"),
     "wf.yaml:17:18: YAML reads 010 as 8: write the number meant in decimal digits, or quote it if it is text"),
    (GOOD.replace("model: x, ", "model: x, max_concurrency: 12:30, "),
     "wf.yaml:4:50: YAML reads 12:30 as 750: write the number meant in decimal digits, or quote it if it is text"),
    (GOOD.replace("  words: {type: integer, default: 50}", "  words: {type: number, default: .nan}"),
     "wf.yaml:10:34: input 'words': default nan is not a finite number"),  # (-i words=nan is refused)
    (GOOD.replace("  topic: {type: string, required: true}", "  topic: {type: string, default: '" + "x" * 2_000_001
                  + "'}"),  # (refused only as the prompt that reads it rendered, after the steps before it)
     "wf.yaml:9:34: input 'topic': its default is 2,000,001 characters; a prompt holds at most 2,000,000 in all: "
     "shorten it"),
    ("pool: {models: {m: {type: openai, model: x}}, agents: [{name: a, model: m}]}\nplan: auto\n"
     "task: '" + "x" * 500_001 + "'\n",
     "wf.yaml:3:7: task: its template has 500,001 characters of its own text; a task is at most 500,000"),
    # literal text no run can send (it refused the step after the steps before it were paid for)
    (GOOD.replace("Review this draft:", "Review this draft: " + "x" * 2_000_001),
     "wf.yaml:18:13: step 'review': its template has 2,000,021 characters of its own text; a template may write "
     "at most 2,000,000: shorten it"),
    (GOOD.replace("skills: [writing]", "skills: [a1, b2, c3, d4, e5, f6]"),
     "wf.yaml:17:29: steps.review.recruit.skills: List should have at most 5 items"),
    (GOOD.replace("skills: [writing]", "skills: [writing, '{json}']"),
     "wf.yaml:17:29: steps.review.recruit.skills: skill '{json}' is not a plain word or phrase"),
    # a missing field is named, where what should hold it is
    (GOOD.replace("  - id: draft\n", "  - agent: writer\n").replace("    agent: writer\n    prompt", "    prompt"),
     "wf.yaml:12:5: steps.0: missing required field 'id'"),
    (GOOD.replace("    prompt: \"Write {{ inputs.words }} words on {{ inputs.topic }}.\"\n", ""),
     "wf.yaml:12:5: steps.draft: missing required field 'prompt'"),
    (GOOD.replace("model: x, ", ""), "wf.yaml:4:8: pool.models.m: missing required field 'model'"),
    (GOOD.replace("    - {name: checker, model: m}", "    - {model: m}"),
     "wf.yaml:7:7: pool.agents.1: missing required field 'name'"),
    (GOOD.replace("    - {name: checker, model: m}", "    - {name: '', model: m}"),  # (it read "pool.agents..name")
     "wf.yaml:7:14: pool.agents.1.name: String should match pattern"),
    # what a run finds only after its calls are spent
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.outptu }}"'),
     "wf.yaml:21:8: final uses steps.review.outptu; a step has output (its text) and data (its JSON, with an "
     "output: schema)"),
    (GOOD.replace("{{ steps.draft.output }}", "{{ steps.draft.data.verdict }}"),
     "wf.yaml:20: step 'review' uses steps.draft.data, but step 'draft' has no output: schema (data is the JSON "
     "it asks for); use steps.draft.output"),
    ("pool: {models: {m: {type: openai, model: x}}, agents: [{name: a, model: m}]}\nplan: auto\n"
     "task: 'Write on tides'\nfinal: '{{ inputs.nothing }}'\n",
     "wf.yaml:4:8: final uses undeclared input 'nothing'; declare it under inputs:"),
    ("pool: {models: {m: {type: openai, model: x}}, agents: [{name: a, model: m}]}\nplan: auto\n"
     "task: 'Improve {{ steps.draft.output }}'\n",
     "wf.yaml:3:7: task uses steps.draft, but the task is written before any step runs; use inputs there"),
    (GOOD.replace("inputs:\n", "task: 'On {{ steps.draft.output }}'\ninputs:\n", 1),
     "wf.yaml:8:7: task uses steps.draft, but the task is written before any step runs; use inputs there"),
    (GOOD.replace("{{ steps.draft.output }}", "{{ steps.keys.output }}"),  # (only a called .keys() is the dict's)
     "wf.yaml:20: step 'review' references unknown step 'keys'"),
    # steps.get('x') is steps.x (its part was not checked: the run failed after the steps were paid)
    (GOOD.replace('final: "{{ steps.review.output }}"', "final: \"{{ steps.get('review').outptu }}\""),
     "wf.yaml:21:8: final uses steps.review.outptu; a step has output (its text) and data"),
    (GOOD.replace("{{ steps.draft.output }}", "{{ steps.get('draft').data.x }}"),
     "wf.yaml:20: step 'review' uses steps.draft.data, but step 'draft' has no output: schema"),
    (GOOD.replace("{{ steps.draft.output }}", "{{ steps.draft.get('outptu') }}"),  # (it sent "None")
     "wf.yaml:20: step 'review' uses steps.draft.outptu; a step has output (its text) and data"),
    ("pool: {models: {m: {type: openai, model: x}}, agents: [{name: a, model: m}]}\nplan: auto\n"
     "task: \"Improve {{ steps.get('draft') }}\"\n",
     "wf.yaml:3:7: task uses steps.draft, but the task is written before any step runs; use inputs there"),
    ("pool: {models: {m: {type: openai, model: x}}, agents: [{name: a, model: m}]}\nplan: auto\n"
     "task: 'Write on tides'\nfinal: '{{ steps.report.data.verdict }}'\n",
     "wf.yaml:4:8: final uses steps.report.data, but planned steps have no output: schema (data is the JSON one "
     "asks for); use steps.report.output"),
    # a data field its schema does not list (the steps were paid, then the final failed to render)
    (reviewed('{type: object, properties: {verdict: {type: string}, notes: {type: string}}}',
              '"{{ steps.review.data.verdikt }}"'),
     "wf.yaml:22:8: final uses steps.review.data.verdikt, but step 'review''s output: schema has no property "
     "'verdikt' (it has: notes, verdict); fix the name, or list it under properties"),
    (reviewed('{type: object, properties: {verdict: {type: string}}}', '"{{ steps[\'review\'].data[\'verdikt\'] }}"'),
     "wf.yaml:22:8: final uses steps.review.data.verdikt, but step 'review''s output: schema has no property"),
    # a step or the inputs given a name of their own (they were checked as nothing: the run failed after paying)
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{% set r = steps.review %}{{ r.outptu }}"'),
     "wf.yaml:21:8: final uses steps.review.outptu; a step has output (its text) and data"),
    (GOOD.replace('final: "{{ steps.review.output }}"',
                  'final: "{% with r = steps.review %}{{ r.outptu }}{% endwith %}"'),
     "wf.yaml:21:8: final uses steps.review.outptu; a step has output (its text) and data"),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{% set all = steps %}{{ all.zz.output }}"'),
     "wf.yaml:21:8: final references unknown step 'zz'"),
    # a misspelt key: named where it is written (not at its value), before the field it left missing
    (GOOD.replace('    prompt: "Write', '    promt: "Write'), "wf.yaml:14:5: unknown field 'promt' (did you mean 'prompt'?)"),
    (GOOD.replace("steps:\n", "stpes:\n"), "wf.yaml:11:1: unknown field 'stpes' (did you mean 'steps'?)"),
    # nested fields, a list read by name, a field of the text, an include (each passed validate, then
    # failed the run after its first steps were paid for)
    (reviewed('{type: object, properties: {info: {type: object, properties: {name: {type: string}}}}}',
              '"{{ steps.review.data.info.nmae }}"'),
     "final uses steps.review.data.info.nmae, but step 'review''s output: schema has no property 'nmae' in "
     "data.info (it has: name)"),
    (reviewed('{type: array, items: {type: object, properties: {name: {type: string}}}}',
              '"{{ steps.review.data.first }} {{ steps.review.data[0].nam }}"'),
     "final uses steps.review.data.first, but step 'review''s output: schema makes data a list (type: array), which "
     "has no field 'first'"),
    (reviewed('{type: array, items: {type: object, properties: {name: {type: string}}}}',
              '"{{ steps.review.data[0].nam }}"'),
     "final uses steps.review.data[0].nam, but step 'review''s output: schema has no property 'nam' in data[0]"),
    (GOOD.replace('final: "{{ steps.review.output }}"', 'final: "{{ steps.review.output.data }}"'),
     "final uses steps.review.output.data, but a step's output is its text, which has no 'data'"),
    (GOOD.replace('final: "{{ steps.review.output }}"', "final: \"{% include 'expert.j2' %}\""),
     "final includes or imports another template"),
    # (a plan's key, which a step calls `needs`: no hint was given)
    (GOOD.replace("needs: [draft]", "depends_on: [draft]"), "unknown field 'depends_on' (did you mean 'needs'?)"),
    (GOOD.replace("skills: [writing]", "skils: [writing]"), "wf.yaml:17:21: unknown field 'skils' (did you mean 'skills'?)"),
    (GOOD.replace("default: 50", "defualt: 50"), "wf.yaml:10:26: unknown field 'defualt' (did you mean 'default'?)"),
    (GOOD.replace("name: demo", "colour: blue"), "wf.yaml:1:1: unknown field 'colour'"),
    # (pydantic's union named a branch: "pool.str: Input should be a valid string"; a folder was "not found")
    ("pool: 5\nsteps:\n  - {id: a, prompt: hi}\n",
     "wf.yaml:1:7: pool: give a pool file's path, or the pool itself (models:, agents:), not 5"),
])
def test_each_broken_workflow_is_one_line_naming_file_and_line(tmp_path: Path, broken: str, expected: str) -> None:
    path = write(tmp_path, broken)
    done = cli("validate", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {tmp_path}/"), lines[0]
    assert expected in lines[0], lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("review", [
    "{{ steps.draft.output[0] }} {{ steps.draft.output.upper() }} {{ steps.draft.output | length }}",  # its text's
    "{% for id in ['draft'] %}{{ steps[id].output }}{% endfor %}",  # a step picked by a computed name
    "{{ steps.draft.get('output') }} {% for part, text in steps.draft.items() %}{{ part }}{% endfor %}",
    "{{ steps.get('draft').output }} {% for id, step in steps.items() %}{{ step.output }}{% endfor %}",
    "{{ steps.draft.keys() | list }} {{ steps.values() | list | length }}",
])
def test_templates_that_render_also_validate(loopback, tmp_path: Path, review: str) -> None:
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    path = write(tmp_path, "name: two\npool: pool.yaml\nsteps:\n  - id: draft\n    agent: alpha-expert\n"
                           "    prompt: Draft a note on tides\n  - id: review\n    needs: [draft]\n"
                           f"    agent: beta-expert\n    prompt: \"Check: {review}\"\n")
    checked = cli("validate", str(path))
    assert checked.returncode == 0, checked.stderr
    done = cli("run", str(path), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "done", done.stderr


def test_validate_reads_a_workflows_data_set_as_a_run_would(tmp_path: Path) -> None:
    text = GOOD.split("inputs:")[0] + ("inputs:\n  question: {type: string, required: true}\n"
                                       "dataset: {path: items.jsonl}\nsteps:\n  - id: answer\n"
                                       "    prompt: \"{{ inputs.question }}\"\n")
    path = write(tmp_path, text)
    (tmp_path / "items.jsonl").write_text('{"id": "a", "question": "1 + 1?", "answer": "2"}\nnot json\n')
    bad = cli("validate", str(path))
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path}/items.jsonl:2: not valid JSON (Expecting value)\n"
    (tmp_path / "items.jsonl").write_text('{"id": "a", "question": "1 + 1?", "answer": "2"}\n')
    good = cli("validate", str(path))
    assert good.returncode == 0 and "(demo: 1 step(s), a data set of 1 item(s), pool" in good.stdout
    (tmp_path / "items.jsonl").write_text('{"id": "a", "question": "1 + 1?", "answer": "2"}\n'
                                          '{"id": "b", "question": "2 + 2?", "answer": "4"}\n')
    limited = cli("validate", str(write(tmp_path, text.replace("{path: items.jsonl}", "{path: items.jsonl, limit: 1}"))))
    assert "a data set of 2 item(s), the first 1 run (limit), pool" in limited.stdout, limited.stdout
    folder = cli("validate", str(write(tmp_path, text.replace("path: items.jsonl", "path: ."))))
    assert folder.returncode == 2 and folder.stderr.endswith(f"the data set {tmp_path} is a folder; name its JSONL "
                                                             "file\n"), folder.stderr  # (it said "not found: .")


@pytest.mark.parametrize("text", ["", "name: broken\n", "name: broken\nagents: []\n"])
def test_a_pool_file_without_models_says_so_in_one_line(tmp_path: Path, text: str) -> None:
    done = cli("agents", "--pool", str(write(tmp_path, text, "pool.yaml")))
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path}/pool.yaml:1:1: missing required field 'models'\n"


def test_a_pool_file_gives_prices_as_a_mapping_or_an_input_output_pair(tmp_path: Path) -> None:
    from orchestra.agents import Pool

    text = ("name: priced\nmodels:\n  m:\n    type: openai\n    model: m\n    base_url: http://127.0.0.1:9/v1\n"
            "    api_key_env: null\n    prices: {prices}\nagents:\n  - name: a\n    model: m\n")
    pair = Pool.load(write(tmp_path, text.replace("{prices}", "[0.15, 0.6]"), "pool.yaml"))
    mapping = Pool.load(write(tmp_path, text.replace("{prices}", "{input: 0.15, output: 0.6}"), "pool.yaml"))
    assert pair.agents[0].model.price == mapping.agents[0].model.price  # type: ignore[attr-defined]
    assert (pair.agents[0].model.price.input, pair.agents[0].model.price.output) == (0.15, 0.6)  # type: ignore
    bad = cli("agents", "--pool", str(write(tmp_path, text.replace("{prices}", "[0.15]"), "pool.yaml")))
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {tmp_path}/pool.yaml:") and bad.stderr.endswith(
        "models.m.prices: give prices as {input: USD, output: USD} per million tokens, or [input, output]\n"), bad.stderr


def test_a_key_written_after_a_yaml_merge_overrides_the_merged_one(tmp_path: Path) -> None:
    """``<<: *anchor`` then ``id: b`` (sharing a step's settings, as every YAML reader allows) was
    refused as a duplicate key; a key written twice is still refused."""
    steps = ("steps:\n  - &base\n    id: draft\n    recruit: &team {k: 2, skills: [writing]}\n"
             "    prompt: \"Write on {{ inputs.topic }}.\"\n  - <<: *base\n    id: again\n    needs: [draft]\n"
             "    recruit: {<<: *team, k: 1}\n    prompt: \"Again: {{ steps.draft.output }}\"\n")
    head = GOOD.split("steps:\n")[0]
    flow = Workflow.load(write(tmp_path, head + steps))
    second = flow.spec.steps[1]
    assert [step.id for step in flow.spec.steps] == ["draft", "again"] and second.prompt.startswith("Again:")
    assert second.recruit is not None and (second.recruit.k, second.recruit.skills) == (1, ["writing"])
    twice = head + steps.replace("    id: again\n", "    id: again\n    id: other\n")
    with pytest.raises(ConfigError, match=r"wf.yaml:\d+:5: duplicate key 'id'"):
        Workflow.load(write(tmp_path, twice))


def test_a_blank_final_is_refused_as_a_blank_prompt_is(tmp_path: Path) -> None:
    """``final: ""`` validated, and the run ended done with a blank answer."""
    with pytest.raises(ConfigError, match=r"wf.yaml:\d+:\d+: final: is blank; write the template of the answer"):
        Workflow.load(write(tmp_path, GOOD.replace('final: "{{ steps.review.output }}"', 'final: "  "')))


def test_step_using_output_it_does_not_need_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("    needs: [draft]\n", "")
    with pytest.raises(ConfigError, match="step 'review' uses steps.draft but does not need 'draft'; add it to needs"):
        Workflow.load(write(tmp_path, text))


def test_inputs_not_a_mapping_are_one_line_and_python_is_told_its_argument(tmp_path: Path) -> None:
    """``run_workflow(flow, None)`` raised "TypeError: 'NoneType' object is not iterable", ``["topic"]`` read its
    item as an input's name, and a missing input told a Python caller only to pass ``-i topic=VALUE``."""
    flow = Workflow.load(write(tmp_path, GOOD))
    for given, kind in ((None, "NoneType"), (["topic"], "list"), ("topic=x", "str")):
        with pytest.raises(ConfigError, match=r"^inputs must be a mapping of input names to values \(\{'name': "
                                              rf"value\}}; \{{\}} for none\), not {kind}$"):
            run_workflow(flow, given)
    with pytest.raises(ConfigError, match=r"wf.yaml:9:10: missing input 'topic'; pass it with -i topic=VALUE \(in "
                                          r"Python: inputs=\{'topic': \.\.\.\}\)$"):
        run_workflow(flow, {})


def test_missing_input_is_one_line_naming_its_declaration(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = cli("run", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {path}:9:10: missing input 'topic'; pass it with -i topic=VALUE (in "
                                   "Python: inputs={'topic': ...})")
    wrong = cli("run", str(path), "-i", "topic=x", "-i", "words=many")
    assert wrong.stderr.strip() == f"error: {path}:10:10: input 'words' must be of type integer, got 'many'"
    unknown = cli("run", str(path), "-i", "colour=red")
    assert "unknown input 'colour' (declared: topic, words)" in unknown.stderr
    misspelt = cli("run", str(path), "-i", "topc=x")  # (named no nearest input)
    assert "unknown input 'topc'; did you mean 'topic'? (declared: topic, words)" in misspelt.stderr
    twice = cli("run", str(path), "-i", "topic=x", "-i", "topic=y")  # (the last one was kept, silently)
    assert twice.returncode == 2 and twice.stderr.strip() == ("error: input 'topic' is given twice (-i topic=x "
                                                              "and -i topic=y); give it once")
    blank = cli("run", str(path), "-i", "topic= ")  # (it sent "Write 50 words on  .")
    assert blank.returncode == 2 and blank.stderr.strip() == (
        f"error: {path}:9:10: input 'topic' is required and was given empty; pass it with -i topic=VALUE (in Python: "
        "inputs={'topic': ...})")
    numbers = path.with_name("numbers.yaml")
    numbers.write_text(GOOD.replace("words: {type: integer, default: 50}", "words: {type: number, default: 50}"))
    for value in ("nan", "inf", "-Infinity"):
        endless = cli("run", str(numbers), "-i", "topic=x", "-i", f"words={value}")
        assert endless.stderr.strip() == (f"error: {numbers}:10:10: input 'words' must be a finite number, "
                                          f"got '{value}'")
    # an integer Python will not read (it was "must be of type integer", with all 5,000 digits on the line)
    huge = cli("run", str(path), "-i", "topic=x", "-i", f"words={'9' * 5000}")
    assert huge.returncode == 2 and huge.stderr.strip() == (
        f"error: {path}:10:10: input 'words' has 5,000 digits, more than the 4,300 Python reads as a number; pass a "
        "smaller one, or declare the input a string")
    # Python's own number forms that are no decimal digits (1000, 3, 3, 3 and 1.5 were taken)
    for value in ("1_000", "\uff13", "\u0663", "\u0663" * 5000, "1_0.5"):
        odd = cli("run", str(numbers if "." in value else path), "-i", "topic=x", "-i", f"words={value}")
        assert odd.returncode == 2 and "must be of type" in odd.stderr, odd.stderr
    long = cli("run", str(path), "-i", "topic=x", "-i", f"words={'x' * 5000}")
    assert long.stderr.strip() == (f"error: {path}:10:10: input 'words' must be of type integer, got "
                                   f"'{'x' * 56}... (5,000 characters)")


def test_an_input_too_long_for_a_command_line_is_read_from_a_file_or_standard_input(loopback, tmp_path: Path) -> None:
    """`-i doc=<600,000 characters>` is past what one argument may hold on Linux (128 KiB): the shell refused it."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    path = write(tmp_path, "name: long\npool: pool.yaml\ninputs:\n  doc: {type: string, required: true}\n"
                           "  n: {type: integer, default: 2}\nsteps:\n  - id: a\n    agent: alpha-expert\n"
                           "    prompt: 'In {{ inputs.n }} lines: {{ inputs.doc }}'\n")
    document = "Line one of the document.\n" + "word " * 150_000 + "\nThe end."
    (tmp_path / "doc.txt").write_text("\ufeff" + document + "\n\n", encoding="utf-8")  # (a mark, the ending newlines)
    (tmp_path / "n.txt").write_text("5\n")
    for given, stdin in ((("--input-file", f"doc={tmp_path / 'doc.txt'}"), None), (("--input-file", "doc=-"), document)):
        sent = len(server.requests)
        done = cli("run", str(path), *given, "--input-file", f"n={tmp_path / 'n.txt'}", "--quiet", stdin=stdin)
        assert done.returncode == 0, done.stderr
        prompts = [r.prompt for r in server.requests[sent:]]
        assert prompts and all(f"In 5 lines: {document}" in prompt for prompt in prompts)
    for given, says in ((("--input-file", "doc"), "error: --input-file expects KEY=PATH, got 'doc'"),
                        (("--input-file", "doc=missing.txt"), "error: --input-file doc: cannot read missing.txt (No "
                                                               "such file or directory)"),
                        (("--input-file", "doc=-", "--input-file", "n=-"), "error: --input-file KEY=- reads standard "
                                                                           "input, which one input can take; give the "
                                                                           "others files")):
        refused = cli("run", str(path), *given, stdin="x")
        assert (refused.returncode, refused.stderr.strip()) == (2, says)
    (tmp_path / "huge.txt").write_text("x" * 2_000_001)  # (every step failed at run time, and each resume)
    huge = cli("run", str(path), "--input-file", f"doc={tmp_path / 'huge.txt'}")
    assert huge.returncode == 2 and huge.stderr.strip().endswith(
        "input 'doc' is 2,000,001 characters; a prompt holds at most 2,000,000 in all, its own text included: pass "
        "a shorter one")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    latin = cli("run", str(path), "--input-file", f"doc={tmp_path / 'latin.txt'}")
    assert latin.stderr.strip() == f"error: --input-file doc: {tmp_path / 'latin.txt'} is not UTF-8 text (byte 0xe9 at offset 3)"


def test_an_optional_input_without_a_default_may_be_left_out(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    path = write(tmp_path, "name: opt\npool: pool.yaml\ninputs:\n  topic: {type: string, required: true}\n"
                           "  note: {type: string}\n  tone: {type: string, required: false}\nsteps:\n"
                           "  - id: a\n    agent: alpha-expert\n"
                           "    prompt: 'On {{ inputs.topic }}{% if inputs.note %} ({{ inputs.note }}){% endif %}'\n")
    done = cli("run", str(path), "-i", "topic=tides", "--json")
    assert done.returncode == 0, done.stderr  # (it said: input 'note' must be of type string, got None)
    result = json.loads(done.stdout)
    assert result["status"] == "done"
    again = cli("resume", result["run_id"], "--json")  # its inputs resolve again from the record
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "done", again.stderr


def test_an_input_or_step_named_like_a_dict_method_is_itself_in_templates(loopback, tmp_path: Path) -> None:
    """``inputs.items`` was the dict's method: the model was sent "<built-in method items of dict
    object at 0x...>", and ``steps.items.output`` failed at run time after the step before was paid."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    path = write(tmp_path, "name: sort\npool: pool.yaml\ninputs:\n  items: {type: string, required: true}\nsteps:\n"
                           "  - {id: items, agent: alpha-expert, prompt: 'Sort these: {{ inputs.items }}'}\n"
                           "  - {id: check, agent: beta-expert, needs: [items], prompt: 'Check: {{ steps.items.output }}'}\n"
                           "final: '{{ steps.check.output }}'\n")
    looped = write(tmp_path, path.read_text().replace("{{ steps.check.output }}", "{% for name, step in steps.items() "
                                                      "%}{{ step.output }}{% endfor %}"), name="looped.yaml")
    refused = cli("validate", str(looped))  # (steps.items is the step now: calling it would fail at run time)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "final calls steps.items(), but steps.items is the step named 'items'; rename the step"), refused.stderr
    done = cli("run", str(path), "-i", "items=pear, apple", "--json")
    assert done.returncode == 0, done.stderr
    prompts = [request.prompt for request in server.requests]
    assert any("Sort these: pear, apple" in prompt for prompt in prompts)
    assert not any("built-in method" in prompt for prompt in prompts)
    assert any("Check: " in prompt and "built-in" not in prompt for prompt in prompts)


def test_a_workflow_named_only_gives_its_steps_no_overall_task(loopback, tmp_path: Path) -> None:
    """Its experts read "Overall task: two-step" (the workflow's name) above their own step's prompt; a
    workflow that says what it is for (a description, or a task) still shows it."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    steps = ("pool: pool.yaml\nsteps:\n  - {id: one, agent: alpha-expert, prompt: 'Name a prime.'}\n"
             "  - {id: two, agent: beta-expert, needs: [one], prompt: 'Double {{ steps.one.output }}.'}\n")
    for head, shown in (("name: two-step\n", None),
                        ("name: two-step\ndescription: Primes, doubled.\n", "Overall task: two-step: Primes, doubled.")):
        sent = len(server.requests)
        done = cli("run", str(write(tmp_path, head + steps)), "--json")
        assert done.returncode == 0, done.stderr
        prompts = [request.prompt for request in server.requests[sent:] if "Name a prime." in request.prompt]
        assert prompts and all(("Overall task" in prompt) == (shown is not None) for prompt in prompts)
        assert shown is None or all(shown in prompt for prompt in prompts)


def test_a_workflow_named_only_gives_its_aggregators_and_final_synthesis_no_overall_task(loopback,
                                                                                           tmp_path: Path) -> None:
    """Its experts no longer read its name as their overall task, but its aggregators still read "Overall task:
    agg" and its final synthesis "Task: agg"; a workflow with a description shows it to both."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    steps = ("pool: pool.yaml\nsteps:\n  - {id: one, recruit: {k: 2, skills: [history]}, prompt: 'Name a prime.'}\n"
             "  - {id: two, recruit: {k: 2, skills: [history]}, prompt: 'Name a square.'}\n")
    for head, shown in (("name: agg\n", None), ("name: agg\ndescription: Numbers.\n", "agg: Numbers.")):
        sent = len(server.requests)
        done = cli("run", str(write(tmp_path, head + steps)), "--json")
        assert done.returncode == 0, done.stderr
        prompts = [request.prompt for request in server.requests[sent:]]
        aggregated = [prompt for prompt in prompts if AGGREGATE_MARK in prompt]
        [final] = [prompt for prompt in prompts if FINAL_MARK in prompt]
        assert len(aggregated) == 2 and "Step results:" in final
        if shown is None:
            assert not any("Overall task" in prompt for prompt in aggregated) and "Task:" not in final
        else:
            assert all(f"Overall task: {shown}" in prompt for prompt in aggregated) and f"Task: {shown}" in final


def test_a_blank_step_prompt_is_one_line_naming_it(tmp_path: Path) -> None:
    blank = write(tmp_path, GOOD.replace('prompt: "Write {{ inputs.words }} words on {{ inputs.topic }}."',
                                         'prompt: "   "'))
    done = cli("validate", str(blank))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {blank}:14:13: steps.draft.prompt: is blank; write what the step "
                                   "should do"), done.stderr


@pytest.mark.parametrize("schema, problem", [
    ("{type: objekt, properties: {v: {type: string}}}", "$.type must be one of object, array"),
    ("{type: object, required: v}", "$.required"),
    ("{$ref: '#/nowhere'}", "$ref"),
    # YAML read yes/no as booleans: the schema sent could take no string (a paid repair, then "expected string")
    ("{type: object, properties: {verdict: {type: string, enum: [yes, no]}}}",
     "$.properties.verdict.enum has True, which is not of type string (unquoted in YAML, the words yes, no, on, off, "
     "true and false are booleans: quote it)"),
    ("{type: array, items: {type: integer, const: '3'}}", "$.items.const has '3', which is not of type integer"),
])
def test_a_step_output_schema_is_checked_at_validate(tmp_path: Path, schema: str, problem: str) -> None:
    broken = write(tmp_path, GOOD.replace("    agent: writer\n", f"    agent: writer\n    output: {schema}\n", 1))
    done = cli("validate", str(broken))
    assert done.returncode == 2, done.stdout  # (it passed, and the run blamed the model for the schema)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {broken}:") and "steps.draft.output: the schema is not usable: " in line
    assert problem in line, line


def test_enum_and_const_values_of_their_schemas_type_validate(tmp_path: Path) -> None:
    """Quoted words, a null a nullable type allows, 2.0 as an integer and an untyped enum are all usable."""
    for schema in ('{type: string, enum: ["yes", "no"]}', "{type: [string, \"null\"], enum: [a, null]}",
                   "{type: integer, enum: [1, 2.0]}", "{enum: [yes, 3]}", "{type: boolean, const: yes}"):
        Workflow.load(write(tmp_path, GOOD.replace("    agent: writer\n", f"    agent: writer\n    output: {schema}\n",
                                                   1)))


@pytest.mark.parametrize("setting", ["max_nodes: 1", "context_chars: 10", "plan_repairs: 0", "planner_max_tokens: 20",
                                     "fast_path: false", "plan_fallback: fail", "plan_check: false", "plan: true"])
def test_a_planning_setting_of_a_workflow_with_steps_is_refused(tmp_path: Path, setting: str) -> None:
    """Each passed validate and did nothing: the steps are written out, not planned (a step's prompt showed
    a needed step's output whole under context_chars: 10)."""
    name, path = setting.split(":")[0], write(tmp_path, f"settings: {{k: 2, {setting}}}\n" + GOOD)
    with pytest.raises(ConfigError, match=rf"wf.yaml:1:\d+: settings\.{name} does nothing here: .+; leave it out$"):
        Workflow.load(path)
    Workflow.load(path, text=path.read_text())  # a run recorded before they were refused still resumes


def test_plan_is_refused_in_any_workflow_and_the_planners_settings_apply_to_plan_auto(tmp_path: Path) -> None:
    """``--set plan=false`` and ``settings: {plan: false}`` were accepted on a ``plan: auto`` workflow, and its
    planner was called all the same; the planner's own settings are kept there (they apply)."""
    auto = GOOD[:GOOD.index("steps:")] + "plan: auto\ntask: 'Write on {{ inputs.topic }}.'\n"
    planned = "settings: {max_nodes: 2, planner_max_tokens: 100, context_chars: 50, fast_path: false, plan_repairs: 0, " \
              "plan_fallback: single, plan_check: false}\n"
    flow = Workflow.load(write(tmp_path, planned + auto))
    assert (flow.settings().max_nodes, flow.settings().context_chars) == (2, 50)
    with pytest.raises(ConfigError, match=r"wf.yaml:1:\d+: settings\.plan does nothing here: whether a workflow is "
                                          r"planned is its plan: auto, or its steps; leave it out$"):
        Workflow.load(write(tmp_path, "settings: {plan: false}\n" + auto))
    done = cli("run", str(write(tmp_path, auto)), "-i", "topic=tides", "--set", "plan=false", "--no-store")
    assert done.returncode == 2 and "error: --set plan does nothing in this workflow: " in done.stderr, done.stderr
    with pytest.raises(ConfigError, match="settings: plan does nothing in workflow 'demo'"):
        orchestra_for(flow, Settings(plan=False), store=False)
    with pytest.raises(ConfigError, match="settings: max_nodes does nothing in workflow 'demo'"):
        orchestra_for(Workflow.load(write(tmp_path, GOOD)), Settings(max_nodes=3), store=False)


def test_plan_or_steps_and_exclusive_expert_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a workflow needs steps, or plan: auto with a task"):
        Workflow.load(write(tmp_path, "pool:\n  models: {m: {type: openai, model: x}}\n  agents: [{name: a, model: m}]\n"))
    both = GOOD.replace("    agent: writer\n", "    agent: writer\n    recruit: {k: 1}\n")
    with pytest.raises(ConfigError, match="a step sets either recruit or agent, not both"):
        Workflow.load(write(tmp_path, both))
    voted = write(tmp_path, GOOD.replace("    agent: writer\n", "    agent: writer\n    aggregate: vote\n"))
    done = cli("validate", str(voted))  # (it passed, and the one expert's answer was the step's output all the same)
    assert (done.returncode, done.stderr.split(": ", 2)[2].strip()) == (
        2, "steps.draft: a step with agent: has that one expert, so there is nothing to aggregate; drop aggregate, "
           "or recruit several experts instead of naming one")
    alone = write(tmp_path, GOOD.replace("    agent: writer\n", "    recruit: {k: 1}\n    aggregate: refine\n"))
    done = cli("validate", str(alone))
    assert (done.returncode, done.stderr.split(": ", 2)[2].strip()) == (
        2, "steps.draft: a step that recruits one expert (k: 1) has nothing to refine; drop aggregate, or recruit "
           "more experts")
    for kept in ("{k: 1}\n    aggregate: vote", "{k: 2}\n    aggregate: refine"):  # (a vote reads its one answer)
        fine = write(tmp_path, GOOD.replace("    agent: writer\n", f"    recruit: {kept}\n"))
        assert cli("validate", str(fine)).returncode == 0


def test_a_setting_given_at_the_top_and_under_settings_is_refused(tmp_path: Path) -> None:
    """The top-level ``seed:``/``budget:`` silently won over the same ones under ``settings:``."""
    twice = "seed: 5\nbudget: {max_calls: 2}\nsettings: {seed: 7, budget: {max_calls: 50, max_tokens: 900}}\n" + GOOD
    # placed at the first one under settings: (3:18 is its seed), not at the file's start
    with pytest.raises(ConfigError, match="wf.yaml:3:18: seed, budget.max_calls are set both at the top and under "
                                          "settings: give each once"):
        Workflow.load(write(tmp_path, twice))
    with pytest.raises(ConfigError, match=r"wf.yaml:1:24: aggregator 'zed' is not an agent of pool"):  # (at run)
        Workflow.load(write(tmp_path, "settings: {aggregator: zed}\n" + GOOD))
    apart = "budget: {max_calls: 2}\nsettings: {seed: 7, budget: {max_tokens: 900}}\n" + GOOD  # fields apart: merged
    budget = Workflow.load(write(tmp_path, apart)).settings().budget
    assert (budget.max_calls, budget.max_tokens) == (2, 900)


def test_workflow_runs_steps_with_their_settings(tmp_path: Path) -> None:
    seen: dict[str, list[str]] = {}

    def answer(name: str):
        def reply(request: ChatRequest) -> object:
            if kind_of(request) == "aggregate":
                return "merged review"
            prompt = request.prompt_text()
            seen.setdefault(name, []).append(prompt)
            if request.wants_json:
                return {"verdict": "approve", "summary": "fine"}
            return f"{name}: draft about tides" if "Write 50 words" in prompt else f"{name}: review ok"
        return reply

    models = {n: FunctionModel(answer(n), name=n) for n in ("w", "c")}
    pool = Pool(agents=[Agent(name="writer", model=models["w"]), Agent(name="checker", model=models["c"])])
    verdict_step = ("  - id: verdict\n    needs: [review]\n    agent: checker\n"
                    "    output: {type: object, properties: {verdict: {type: string}, summary: {type: string}}, "
                    "required: [verdict]}\n    prompt: \"Verdict on: {{ steps.review.output }}\"\n")
    text = GOOD.replace('final: "{{ steps.review.output }}"',
                        verdict_step + 'final: "{{ steps.verdict.data.verdict }} / {{ steps.review.output }}"')
    flow = Workflow.load(write(tmp_path, text), pool=pool)
    result = run_workflow(flow, {"topic": "tides"})
    assert result.status == "done", result.error
    assert result.answer == "approve / merged review"
    draft = result.node("draft")
    assert draft.experts == ["writer"] and draft.output == "w: draft about tides"
    review = result.node("review")
    assert len(review.experts) == 2 and review.skills == ["writing"] and review.aggregator
    assert any("Review this draft:\nw: draft about tides" in p for prompts in seen.values() for p in prompts)
    assert result.node("verdict").data == {"verdict": "approve", "summary": "fine"}
    assert not any(kind_of(r) == "keywords" for m in models.values() for r in m.requests)


def test_a_step_may_need_more_steps_than_a_planner_may_write(tmp_path: Path) -> None:
    """A fan-in of 13 parts validates and runs (a step's needs were capped at 12, a planner's limit:
    validate said ok, then the run died of a traceback)."""
    def answer(request: ChatRequest) -> str:
        chapter = re.search(r"Summarise chapter (\d+)", request.prompt_text())
        return f"summary {chapter.group(1)}." if chapter else "merged"

    model = FunctionModel(answer, name="w")
    pool = Pool(agents=[Agent(name="writer", model=model)])
    parts = "".join(f"  - id: part{i}\n    agent: writer\n    prompt: Summarise chapter {i}.\n" for i in range(13))
    needs = ", ".join(f"part{i}" for i in range(13))
    merge = ("  - id: merge\n    agent: writer\n    needs: [" + needs + "]\n    prompt: \"Merge: "
             + " ".join("{{ steps.part" + str(i) + ".output }}" for i in range(13)) + "\"\n")
    text = "name: fan-in\nsteps:\n" + parts + merge + "final: \"{{ steps.merge.output }}\"\n"
    flow = Workflow.load(write(tmp_path, text), pool=pool)
    result = run_workflow(flow, {})
    assert result.status == "done", result.error
    assert result.answer == "merged" and len(model.requests) == 14
    assert all(f"summary {i}." in model.requests[-1].prompt_text() for i in range(13))


@pytest.fixture
def loopback_pool(loopback, tmp_path: Path) -> tuple[ScriptedLLM, Path]:
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    return scripted, write_pool(tmp_path, server.url, agents=LOCAL_AGENTS)


def test_example_research_brief_runs(loopback_pool) -> None:
    scripted, pool = loopback_pool
    scripted.plan = {"subtasks": [
        {"id": "facts", "instruction": "List the key facts of tidal energy.", "depends_on": []},
        {"id": "questions", "instruction": "Name two open questions about tidal energy.", "depends_on": []},
        {"id": "summary", "instruction": "Summarise the brief in one paragraph.", "depends_on": ["facts", "questions"]},
    ]}
    done = cli("run", str(EXAMPLES / "workflows/research-brief.yaml"), "-i", "topic=tidal energy",
               "--pool", str(pool), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "done" and len(data["plan"]["nodes"]) == 3
    assert "tidal energy" in data["task"] and scripted.kinds["plan"] == 1


def test_example_code_review_runs(loopback_pool) -> None:
    scripted, pool = loopback_pool
    scripted.structured = {"verdict": "approve", "summary": "looks right"}
    scripted.expert = lambda model, assignment: f"{model}: notes"
    done = cli("run", str(EXAMPLES / "workflows/code-review.yaml"), "-i", "code=def add(a, b): return a + b",
               "--pool", str(pool), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["answer"].startswith("## Code review\n**Verdict:** approve: looks right")
    assert [n["id"] for n in data["plan"]["nodes"]] == ["understand", "bugs", "style", "verdict"]
    # each step's instruction is its prompt as rendered for the experts, in the result and in `show`
    understand = data["plan"]["nodes"][0]["instruction"]
    assert "def add(a, b): return a + b" in understand and "{{" not in understand
    shown = cli("show", data["run_id"]).stdout
    assert "understand: " in shown and "def add(a, b): return a + b" in shown.split("call 1")[0]


def test_the_readmes_python_workflow_example_runs(loopback_pool) -> None:
    """The README's `Workflow.load` + `run_workflow` example, on the loopback pool."""
    scripted, pool = loopback_pool
    scripted.structured = {"verdict": "request changes", "summary": "it subtracts"}
    flow = Workflow.load(EXAMPLES / "workflows/code-review.yaml", pool=Pool.load(pool))
    result = run_workflow(flow, {"code": "def add(a, b): return a - b"})
    assert result.status == "done" and result.answer.startswith("## Code review\n**Verdict:** request changes")
    assert result.usage.calls > 0
    again = run_workflow(flow, {"code": "def f(): pass"}, orchestra=Orchestra(flow.pool, store=False), seed=3)
    assert again.status == "done" and again.plan is not None
    assert [n.id for n in again.plan.nodes] == ["understand", "bugs", "style", "verdict"]


def test_example_dataset_eval_runs(loopback_pool) -> None:
    _, pool = loopback_pool
    done = cli("run", str(EXAMPLES / "workflows/dataset-eval.yaml"), "--pool", str(pool), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["items"] == 6 and report["method"] == "quiz-eval"
    assert report["correct"] == 1  # the scripted experts always answer 42: right for q1 only


def test_example_pipeline_runs(loopback_pool) -> None:
    import subprocess
    import sys

    _, pool = loopback_pool
    done = subprocess.run([sys.executable, str(EXAMPLES / "pipeline.py"), str(pool)], capture_output=True,
                          text=True, env={**__import__("os").environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "answer:" in done.stdout and "experts" in done.stdout


@pytest.mark.parametrize("pool", sorted((EXAMPLES / "pools").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_pools_load(pool: Path) -> None:
    loaded = Pool.load(pool)
    assert loaded.agents and all(a.model is not None for a in loaded.agents)


def test_template_errors_at_run_time_fail_the_step_with_one_line(tmp_path: Path) -> None:
    text = GOOD.replace("Write {{ inputs.words }} words", "Write {{ inputs.words + 'x' }} words")
    pool = Pool(agents=[Agent(name="writer", model=FunctionModel(lambda r: "x", name="w")),
                        Agent(name="checker", model=FunctionModel(lambda r: "x", name="c"))])
    flow = Workflow.load(write(tmp_path, text), pool=pool)
    result = run_workflow(flow, {"topic": "tides"})
    assert result.status == "failed"
    error = result.node("draft").error
    assert error.startswith(f"cannot render {tmp_path}/wf.yaml: step 'draft': TypeError") and "\n" not in error


def test_an_empty_output_schema_asks_for_any_json_value(tmp_path: Path) -> None:
    """``output: {}`` is a schema that allows any JSON value (as for an answer), not no schema:
    the step asks for JSON, its experts' and aggregator's, and its data is the value."""
    def reply(request: ChatRequest) -> object:
        return {"facts": ["tides"]} if request.wants_json else "plain text"

    models = [FunctionModel(reply, name=name) for name in ("w", "c")]
    pool = Pool(agents=[Agent(name="writer", model=models[0]), Agent(name="checker", model=models[1])])
    text = GOOD.replace("    agent: writer\n", "    agent: writer\n    output: {}\n").replace(
        'final: "{{ steps.review.output }}"', 'final: "{{ steps.draft.data.facts[0] }}"')
    result = run_workflow(Workflow.load(write(tmp_path, text), pool=pool), {"topic": "tides"})
    assert result.status == "done" and result.answer == "tides", result.error
    assert result.node("draft").data == {"facts": ["tides"]}
    drafted = [r for r in models[0].requests if "Write 50 words" in r.prompt_text()]
    assert drafted and all(r.wants_json for r in drafted)


def test_a_step_prompt_that_renders_blank_fails_the_step_without_a_call(tmp_path: Path) -> None:
    """A prompt that passes validation but renders to nothing (a condition that is false) is not
    sent: its experts would be asked to do nothing."""
    text = GOOD.replace("Write {{ inputs.words }} words on {{ inputs.topic }}.",
                        "{% if inputs.words > 100 %}Write at length on {{ inputs.topic }}.{% endif %}")
    models = [FunctionModel(lambda r: "x", name=name) for name in ("w", "c")]
    pool = Pool(agents=[Agent(name="writer", model=models[0]), Agent(name="checker", model=models[1])])
    result = run_workflow(Workflow.load(write(tmp_path, text), pool=pool), {"topic": "tides"})
    assert result.status == "failed" and result.node("review").status == "skipped"
    assert result.node("draft").error == f"cannot render {tmp_path}/wf.yaml: step 'draft': the prompt is empty once rendered"
    assert not models[0].requests and not models[1].requests


def test_a_step_sees_only_the_steps_it_needs_even_by_a_name_it_works_out(tmp_path: Path) -> None:
    """`steps[name]` with a computed name read whichever steps had happened to finish first (validate sees no
    name), and failed, when the step had not, with Jinja's "'dict object' has no attribute 'b'"."""
    text = ("name: loop\nsteps:\n  - {id: a, agent: writer, prompt: A}\n  - {id: b, agent: writer, prompt: B}\n"
            "  - {id: e, needs: [a], agent: checker, prompt: \"{% set k = 'NAME' %}{{ steps[k].output }}\"}\n")
    models = [FunctionModel(lambda r: "x", name=name) for name in ("w", "c")]
    pool = Pool(agents=[Agent(name="writer", model=models[0]), Agent(name="checker", model=models[1])])
    for name, why in (("b", "it reads steps['b'] but does not need 'b'; add 'b' to its needs"),
                      ("zz", "it reads steps['zz'], and there is no step 'zz' (steps: a, b, e)"),
                      ("e", "it reads its own output, which it is writing")):
        result = run_workflow(Workflow.load(write(tmp_path, text.replace("NAME", name)), pool=pool), {})
        assert result.node("b").status == "done"  # (b ran beside a, and had finished)
        assert result.node("e").error == f"cannot render {tmp_path}/wf.yaml: step 'e': {why}"
    assert not models[1].requests
    result = run_workflow(Workflow.load(write(tmp_path, text.replace("NAME", "a")), pool=pool), {})
    assert result.status == "done" and "Your assignment: x\n" in models[1].requests[-1].prompt_text()  # a, needed


def test_a_final_that_renders_blank_fails_the_run_as_a_user_error(tmp_path: Path) -> None:
    """It made a `done` run with an empty answer, exit 0 (a blank step prompt and a literal blank final
    are refused)."""
    text = GOOD.replace('final: "{{ steps.review.output }}"',
                        'final: "{% if inputs.words > 100 %}{{ steps.review.output }}{% endif %}  "')
    models = [FunctionModel(lambda r: "x", name=name) for name in ("w", "c")]
    pool = Pool(agents=[Agent(name="writer", model=models[0]), Agent(name="checker", model=models[1])])
    result = run_workflow(Workflow.load(write(tmp_path, text), pool=pool), {"topic": "tides"})
    assert (result.status, result.answer, result.exit_code) == ("failed", None, 2)
    assert result.error == (f"cannot render {tmp_path}/wf.yaml: final: the answer is empty once rendered (a template "
                            "that writes nothing for these inputs)")


def test_yaml_alias_bombs_and_loops_are_refused(tmp_path: Path) -> None:
    loop = write(tmp_path, "a: &a [*a]\n", "loop.yaml")
    with pytest.raises(ConfigError, match="loop.yaml:1:4: an alias refers to a value that contains it"):
        Workflow.load(loop)
    rows = ["a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(5)]
    bomb = write(tmp_path, "\n".join(rows) + "\n", "bomb.yaml")
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        Workflow.load(bomb)
    for depth in (600, 5000):  # deeper than the parser recurses (composing, then building): no RecursionError
        deep = write(tmp_path, GOOD.replace('name: demo', 'name: demo\ndescription: ' + "[" * depth + "]" * depth),
                     "deep.yaml")
        # pointed at the list that opens the 100th level (the top mapping is the first; line 2 holds them)
        with pytest.raises(ConfigError, match=r"deep.yaml:2:112: invalid YAML: nested too deeply to read .*from here"):
            Workflow.load(deep)


def test_workflow_resume_keeps_the_run_options(loopback, tmp_path: Path) -> None:
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    pool = write_pool(tmp_path, server.url, agents=LOCAL_AGENTS)
    flow = EXAMPLES / "workflows/research-brief.yaml"
    stopped = cli("run", str(flow), "-i", "topic=tides", "--pool", str(pool), "--seed", "5", "--k", "2",
                  "--max-calls", "4", "--json")
    assert stopped.returncode == 3, stopped.stderr
    run_id = json.loads(stopped.stdout)["run_id"]
    sent = sum(scripted.kinds.values())
    resumed = cli("resume", run_id, "--max-calls", "50", "--json")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["usage"]["replayed_calls"] == 4  # the same seed and k: every recorded call matched
    assert all(len(n["experts"]) == 2 for n in data["plan"]["nodes"])
    assert sum(scripted.kinds.values()) - sent == data["usage"]["calls"] - 4


@pytest.mark.parametrize("text, expected", [
    ("name: x\nsteps: [1, 2\n", "x.yaml:2:8: invalid YAML: a flow sequence that starts here is never closed"),
    ("name: x\nmeta: {a: 1\n", "x.yaml:2:7: invalid YAML: a flow mapping that starts here is never closed"),
])
def test_an_unclosed_bracket_is_reported_where_it_opens(text: str, expected: str) -> None:
    from orchestra.yamlfile import read_yaml

    with pytest.raises(ConfigError) as error:
        read_yaml("x.yaml", text)  # type: ignore[arg-type]
    assert str(error.value).startswith(expected), str(error.value)


def test_a_key_yaml_would_read_as_a_boolean_is_the_word_written() -> None:
    """``inputs: {no: ...}`` was ``inputs.0: Input should be a valid string`` (YAML 1.1 read the key as false)."""
    from orchestra.yamlfile import read_yaml

    document = read_yaml("x.yaml", "inputs:\n  no: {type: string}\n  on: {default: yes}\n  'true': {}\n")  # type: ignore[arg-type]
    assert document.data == {"inputs": {"no": {"type": "string"}, "on": {"default": True}, "true": {}}}


def test_a_given_grader_grades_a_data_set_workflow(loopback_pool, tmp_path: Path) -> None:
    scripted, pool = loopback_pool
    scripted.expert = lambda model, assignment: "The answer is 42.0"  # a number, not the reference's text
    (tmp_path / "quiz.jsonl").write_text('{"id": "q0", "question": "Six times seven?", "answer": "42"}\n')
    flow = write(tmp_path, f"name: quiz\npool: {pool}\ninputs:\n  question: {{type: string}}\n"
                           "dataset: {path: quiz.jsonl}\nsteps:\n  - id: answer\n    agent: alpha-expert\n"
                           "    prompt: '{{ inputs.question }}'\n")

    def accuracy(*flags: str) -> float:
        done = cli("run", str(flow), "--json", *flags)
        assert done.returncode == 0, done.stderr
        return float(json.loads(done.stdout)["accuracy"])

    assert accuracy() == 1.0  # auto: a number graded as a number
    assert accuracy("--grader", "exact") == 0.0  # (the flag was ignored: 1.0)
    assert accuracy("--set", "grader=exact") == 0.0
    flow.write_text(flow.read_text().replace("{path: quiz.jsonl}", "{path: quiz.jsonl, grader: exact}"))
    assert accuracy() == 0.0 and accuracy("--grader", "numeric") == 1.0  # the flag wins over the file
    # a grader that could grade no item correct (mc without choices) is refused before any call, as eval does
    # (the run paid for every item and graded each wrong; validate said ok)
    sent = sum(scripted.kinds.values())
    refused = cli("run", str(flow), "--grader", "mc")
    says = (f"error: the mc grader cannot grade item q0 of {tmp_path / 'quiz.jsonl'}: its answer '42' is not the "
            "letter of a choice (it has no choices); choose another grader (auto picks one per item)\n")
    assert (refused.returncode, refused.stderr) == (2, says)
    flow.write_text(flow.read_text().replace("grader: exact", "grader: mc"))
    assert (cli("validate", str(flow)).stderr, cli("run", str(flow)).stderr) == (says, says)
    assert sum(scripted.kinds.values()) == sent


def stopped_after_step_a(loopback, tmp_path: Path) -> tuple[Any, Path, str]:
    """A two-step workflow run (b needs a) that its budget stopped after step a: the server, the
    workflow file and the run's id."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    path = write(tmp_path, "name: two\npool: pool.yaml\nsteps:\n  - id: a\n    agent: alpha-expert\n"
                           "    prompt: Draft a note on tides\n  - id: b\n    needs: [a]\n    agent: beta-expert\n"
                           "    prompt: 'Check this: {{ steps.a.output }}'\n")
    stopped = cli("run", str(path), "--max-calls", "1", "--json")
    assert stopped.returncode == 3, stopped.stderr  # step a answered, b refused by the budget
    return server, path, json.loads(stopped.stdout)["run_id"]


def test_resume_renders_the_workflow_as_it_was_when_the_run_began(loopback, tmp_path: Path) -> None:
    server, path, run_id = stopped_after_step_a(loopback, tmp_path)
    sent = [r.prompt for r in server.requests]
    path.write_text(path.read_text().replace("Draft a note on tides", "Draft a note on volcanoes")
                    .replace("id: a", "id: first").replace("[a]", "[first]").replace("steps.a.", "steps.first."))
    resumed = cli("resume", run_id, "--max-calls", "5", "--json")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["status"] == "done" and [n["id"] for n in result["plan"]["nodes"]] == ["a", "b"]
    later = [r.prompt for r in server.requests[len(sent):]]
    # only b's call: a's answer was replayed, and nothing of the edited file reached the model
    assert len(later) == 1 and "Check this:" in later[0] and not any("volcanoes" in p for p in later), later


def test_resume_needs_no_workflow_file(loopback, tmp_path: Path) -> None:
    server, path, run_id = stopped_after_step_a(loopback, tmp_path)
    path.unlink()  # moved away (or broken): the run's record holds the text it began with
    resumed = cli("resume", run_id, "--max-calls", "5", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "done" and len(server.requests) == 2


def test_run_resume_of_a_single_run_goes_on_with_the_workflows_latest_unfinished_run(loopback,
                                                                                     tmp_path: Path) -> None:
    """It was refused with `orchestra resume RUN_ID`, naming no run: the user had to find it in `orchestra runs`."""
    server, path, first = stopped_after_step_a(loopback, tmp_path)
    second = json.loads(cli("run", str(path), "--max-calls", "1", "--json").stdout)["run_id"]
    sent = len(server.requests)
    latest = cli("run", str(path), "--resume", "--max-calls", "5", "--json")
    assert latest.returncode == 0, latest.stderr
    result = json.loads(latest.stdout)
    assert (result["run_id"], result["status"], result["usage"]["replayed_calls"]) == (second, "done", 1)
    assert len(server.requests) == sent + 1  # only step b: a's answer was replayed, as `orchestra resume` does
    assert (f"note: resuming run {second}, the latest of 2 unfinished runs of workflow 'two' (`orchestra runs` "
            "lists them; `orchestra resume RUN_ID` resumes another)") in latest.stderr
    other = cli("run", str(path), "--resume", "--max-calls", "5", "--json")
    assert (other.returncode, json.loads(other.stdout)["run_id"]) == (0, first), other.stderr
    assert "note:" not in other.stderr  # (the only unfinished run: nothing to say which)
    done = cli("run", str(path), "--resume")
    assert (done.returncode, done.stderr.strip()) == (2, (
        f"error: no unfinished run of workflow 'two' ({path.resolve()}) in {default_store_path()} to resume; its "
        f"latest finished run is shown with `orchestra show {first}`")), done.stderr
    empty = tmp_path / "empty.db"
    RunStore(empty).close()
    nothing = cli("run", str(path), "--resume", "--store", str(empty))
    assert (nothing.returncode, nothing.stderr.strip()) == (2, (
        f"error: no run of workflow 'two' ({path.resolve()}) in {empty} to resume: run it without --resume (a "
        "finished run is shown with `orchestra show RUN_ID`)")), nothing.stderr
    for flags, leave_out in ((("-i", "x=1"), "inputs and pool; leave out -i, --input-file and --pool"),
                             (("--k", "2"), "settings (a budget aside); leave out what sets k")):
        refused = cli("run", str(path), "--resume", *flags)
        assert refused.returncode == 2 and f"--resume goes on with the run's own {leave_out}" in refused.stderr
    assert len(server.requests) == sent + 2


def two_steps_apart(loopback, tmp_path: Path, b_prompt: str) -> tuple[Any, Path]:
    """A workflow of two steps that do not need each other (a drafts; b's prompt is ``b_prompt``, a
    YAML scalar) on a scripted loopback pool: the server and the file."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    return server, write(tmp_path, "name: two\npool: pool.yaml\nsteps:\n  - id: a\n    agent: alpha-expert\n"
                                   "    prompt: Draft a note on tides\n  - id: b\n    agent: beta-expert\n"
                                   f"    prompt: {b_prompt}\n")


def test_a_step_that_cannot_render_is_a_user_error_even_when_another_step_answered(loopback, tmp_path: Path) -> None:
    server, path = two_steps_apart(loopback, tmp_path, "'Count {{ 9 ** (9 ** 9) }}'")
    assert cli("validate", str(path)).returncode == 0  # (validate never evaluates expressions)
    done = cli("run", str(path), "--json")
    assert json.loads(done.stdout)["status"] == "partial" and len(server.requests) == 1  # a answered
    assert done.returncode == 2, done.stderr  # the workflow is what to fix (was 1, as for a failed endpoint)
    run_id = json.loads(done.stdout)["run_id"]
    assert done.stderr.strip().splitlines() == [
        f"error: run {run_id} partial: b: cannot render {path}: step 'b': a number in a template went over 256 "
        f"bits; fix the workflow, then `orchestra resume {run_id} --reload` (its answers are kept)"]
    path.write_text(path.read_text().replace("Count {{ 9 ** (9 ** 9) }}", "Count") + "final: '{{ 9 ** (9 ** 9) }}'\n")
    final = cli("run", str(path), "--json")
    assert json.loads(final.stdout)["status"] == "failed" and final.returncode == 2, final.stderr  # (was 1)


def test_a_final_template_waits_for_every_step_and_a_partial_run_answers_with_what_finished(
        loopback, tmp_path: Path) -> None:
    _, path = two_steps_apart(loopback, tmp_path, "'Count {{ 9 ** (9 ** 9) }}'")  # b cannot render
    path.write_text(path.read_text() + "final: '{{ steps.a.output }} / {{ steps.b.output }}'\n")
    done = json.loads(cli("run", str(path), "--json").stdout)
    assert done["status"] == "partial" and done["answer"] == done["plan"]["nodes"][0]["output"]  # step a's


def test_a_data_set_item_whose_template_fails_is_named_with_the_resume_that_finishes_it(loopback,
                                                                                       tmp_path: Path) -> None:
    """It named the item only: the fix a user tried (`run --resume` after editing the file, a new
    workflow) ran every item again."""
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    (tmp_path / "quiz.jsonl").write_text('{"id": "q0", "question": "Six times seven?", "answer": "0"}\n'
                                         '{"id": "q1", "question": "Two times one?", "answer": "1"}\n')
    path = write(tmp_path, f"name: quiz\npool: {pool}\ninputs:\n  question: {{type: string}}\n"
                           "dataset: {path: quiz.jsonl}\nsteps:\n  - id: a\n    agent: alpha-expert\n"
                           "    prompt: '{{ inputs.question }}'\n  - id: b\n    needs: [a]\n    agent: beta-expert\n"
                           "    prompt: \"Check {{ 1 // (inputs.question | length - 16) }}: {{ steps.a.output }}\"\n")
    failed = cli("run", str(path))
    [run] = [r for r in json.loads(cli("runs", "--json").stdout) if r["status"] != "done"]
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].endswith(
        f"ZeroDivisionError: integer division or modulo by zero; fix the workflow, then `orchestra resume {run['id']} "
        "--reload` finishes that item with its answers kept (`orchestra runs` lists the other unfinished items' "
        "runs)"), failed.stderr
    path.write_text(path.read_text().replace("- 16)", "- 15)"))
    sent = len(server.requests)
    assert cli("resume", run["id"], "--reload").returncode == 0 and len(server.requests) == sent + 1  # (b alone)


def test_a_data_set_items_run_resumes_without_its_data_set_and_names_a_missing_pool(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    text = (f"name: quiz\npool: {pool}\ninputs:\n  question: {{type: string}}\n"
            "dataset: {path: quiz.jsonl}\nsteps:\n  - id: a\n    agent: alpha-expert\n"
            "    prompt: '{{ inputs.question }}'\n  - id: b\n    needs: [a]\n    agent: beta-expert\n"
            "    prompt: 'Check: {{ steps.a.output }}'\n")

    def stopped_item() -> str:
        (tmp_path / "quiz.jsonl").write_text('{"id": "q0", "question": "Six times seven?", "answer": "42"}\n')
        assert cli("run", str(write(tmp_path, text)), "--max-calls", "1").returncode == 3
        return str(json.loads(cli("runs", "--json").stdout)[0]["id"])

    run_id = stopped_item()
    (tmp_path / "quiz.jsonl").unlink()  # the item's question is in the run's record, and so is the workflow
    (tmp_path / "wf.yaml").unlink()
    resumed = cli("resume", run_id, "--max-calls", "5", "--json")
    assert resumed.returncode == 0, resumed.stderr  # (was: data set not found)
    assert json.loads(resumed.stdout)["status"] == "done" and len(server.requests) == 2
    done_id = run_id
    run_id = stopped_item()
    (tmp_path / "quiz.jsonl").unlink()
    reloaded = cli("resume", run_id, "--reload", "--max-calls", "5", "--json")  # the file as it is now, no data set
    assert reloaded.returncode == 0 and json.loads(reloaded.stdout)["status"] == "done", reloaded.stderr
    run_id = stopped_item()
    pool.unlink()
    gone = cli("resume", run_id)
    assert (gone.returncode, gone.stderr) == (2, f"error: run {run_id} used pool {pool}, which no longer exists\n")
    sent = len(server.requests)
    for as_json in ((), ("--json",)):  # a finished run has nothing to send: its answer, pool or none (it was exit 2)
        finished = cli("resume", done_id, *as_json)
        assert finished.returncode == 0, finished.stderr
        assert (json.loads(finished.stdout)["run_id"] == done_id) if as_json else finished.stdout.strip()
    assert len(server.requests) == sent
    reloaded = cli("resume", done_id, "--reload")  # (it said the pool was gone, not why --reload cannot apply)
    assert reloaded.returncode == 2 and f"run {done_id} is done: --reload applies an edited workflow" in reloaded.stderr


def test_resume_reload_finishes_a_run_with_the_template_fixed_since(loopback, tmp_path: Path) -> None:
    server, path = two_steps_apart(loopback, tmp_path,
                                   "\"Check: {% for id in ['a'] %}{{ steps[id].output }}{% endfor %}\"")
    failed = cli("run", str(path), "--json")  # b reads a without needing it: nothing to read when it renders
    assert failed.returncode == 2 and "it reads steps['a'] but does not need 'a'; add 'a' to its needs" in failed.stderr, failed.stderr
    run_id = json.loads(failed.stdout)["run_id"]
    path.write_text(path.read_text().replace("    agent: beta-expert\n", "    needs: [a]\n    agent: beta-expert\n"))
    again = cli("resume", run_id, "--json")  # the recorded text: the same failure
    assert again.returncode == 2 and "it reads steps['a'] but does not need 'a'" in again.stderr
    sent = len(server.requests)
    fixed = cli("resume", run_id, "--reload", "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["status"] == "done"
    later = [r.prompt for r in server.requests[sent:]]
    assert len(later) == 1 and "Check: " in later[0]  # a's answer replayed; b's call sent once, rendered
    assert json.loads(cli("resume", run_id, "--json").stdout)["status"] == "done"  # (recorded as done)
    done = cli("resume", run_id, "--reload")  # (it answered the recorded run: an edit since was left out unsaid)
    assert (done.returncode, done.stderr) == (2, f"error: run {run_id} is done: --reload applies an edited workflow "
                                                 "to a run that did not finish; run the edited workflow anew "
                                                 "(`orchestra run FILE`)\n")
    for limit in ("1", "100"):  # a plain run, unfinished or done
        plain = cli("ask", "Quick question", "--no-plan", "--pool", str(tmp_path / "pool.yaml"), "--max-calls", limit,
                    "--json")
        refused = cli("resume", json.loads(plain.stdout)["run_id"], "--reload")
        assert refused.returncode == 2 and "is not a workflow run; --reload reads a workflow file again" in (
            refused.stderr)


def test_resume_reload_takes_an_inputs_default_changed_since_and_keeps_a_given_input(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    text = ("name: ratio\npool: pool.yaml\ninputs:\n  n: {type: integer, default: 0}\n  m: {type: integer, default: 0}\n"
            "steps:\n  - id: a\n    agent: alpha-expert\n    prompt: Draft a note on tides\n  - id: b\n    needs: [a]\n"
            "    agent: beta-expert\n    prompt: 'Ratio {{ 10 // inputs.n }} and {{ inputs.m }}'\n")
    path = write(tmp_path, text)
    failed = cli("run", str(path), "-i", "m=0", "--json")  # n takes its default, m is given (as the default is)
    assert failed.returncode == 2 and "ZeroDivisionError" in failed.stderr, failed.stderr
    run_id = json.loads(failed.stdout)["run_id"]
    # the obvious fix, a default that cannot divide by zero: a resume that reads the file again takes it (the
    # run kept the old default, and failed the same way for ever); what the user gave stays
    path.write_text(text.replace("n: {type: integer, default: 0}", "n: {type: integer, default: 2}")
                    .replace("m: {type: integer, default: 0}", "m: {type: integer, default: 7}"))
    sent = len(server.requests)
    fixed = cli("resume", run_id, "--reload", "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["status"] == "done", fixed.stderr
    later = [r.prompt for r in server.requests[sent:]]
    assert len(later) == 1 and "Your assignment: Ratio 5 and 0\n" in later[0]  # a's answer replayed
    recorded = RunStore(default_store_path()).run(run_id).config["spec"]["workflow"]
    assert (recorded["inputs"], recorded["defaulted"]) == ({"n": 2, "m": 0}, ["n"])


def test_resume_reload_takes_an_input_the_edited_file_added(loopback, tmp_path: Path) -> None:
    """The fix needed a new required input: `resume --reload` said "missing input 'extra'; pass it with -i
    extra=VALUE", and `resume` took no -i ("No such option '-i'"): the run could not be finished."""
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    text = ("name: grow\npool: pool.yaml\ninputs:\n  topic: {type: string, required: true}\n"
            "  n: {type: integer, default: 0}\nsteps:\n  - id: a\n    agent: alpha-expert\n"
            "    prompt: 'Draft a note on {{ inputs.topic }}'\n  - id: b\n    needs: [a]\n    agent: beta-expert\n"
            "    prompt: 'Ratio {{ 10 // inputs.n }}'\n")
    path = write(tmp_path, text)
    failed = cli("run", str(path), "-i", "topic=tides", "--json")
    assert failed.returncode == 2 and "ZeroDivisionError" in failed.stderr, failed.stderr
    run_id = json.loads(failed.stdout)["run_id"]
    path.write_text(text.replace("default: 0}", "default: 2}\n  extra: {type: string, required: true}")
                    .replace("'Ratio {{ 10 // inputs.n }}'", "'Ratio {{ 10 // inputs.n }} of {{ inputs.extra }}'"))
    missing = cli("resume", run_id, "--reload")
    assert missing.returncode == 2 and "missing input 'extra'; pass it with -i extra=VALUE" in missing.stderr
    unread = cli("resume", run_id, "-i", "extra=kelp")  # (the recorded file has no such input: it would be dropped)
    assert unread.returncode == 2 and "-i sets an input of the workflow file read again: add --reload" in unread.stderr
    with pytest.raises(ConfigError, match="inputs are given to a resume that reads the workflow file again"):
        Orchestra.resuming(run_id, store=RunStore(default_store_path())).resume(run_id, inputs={"extra": "kelp"})
    sent = len(server.requests)
    fixed = cli("resume", run_id, "--reload", "-i", "extra=kelp", "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["status"] == "done", fixed.stderr
    later = [r.prompt for r in server.requests[sent:]]
    assert len(later) == 1 and "Your assignment: Ratio 5 of kelp\n" in later[0]  # a's answer replayed
    recorded = RunStore(default_store_path()).run(run_id).config["spec"]["workflow"]
    assert (recorded["inputs"], recorded["defaulted"]) == ({"topic": "tides", "n": 2, "extra": "kelp"}, ["n"])


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_during_a_data_set_workflow_prints_the_items_finished(loopback, tmp_path: Path, as_json: bool) -> None:
    import os
    import signal
    import subprocess
    import sys

    from helpers import wait_for

    from orchestra.testing import LoopbackRequest, Reply

    inner = ScriptedLLM().handler()

    async def handler(request: LoopbackRequest) -> Reply:
        return Reply(hang=True) if "question q2" in request.prompt else await inner(request)

    server = loopback(handler)
    write_pool(tmp_path, server.url)
    (tmp_path / "quiz.jsonl").write_text("".join(
        f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(3)))
    path = write(tmp_path, "name: quiz\npool: pool.yaml\ninputs:\n  question: {type: string}\n"
                           "dataset: {path: quiz.jsonl}\nsteps:\n  - id: answer\n    agent: alpha-expert\n"
                           "    prompt: '{{ inputs.question }}'\n")
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "run", str(path), *(["--json"] if as_json else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "COLUMNS": "120"})

    def two_done() -> bool:
        listed = cli("runs", "--json")
        return listed.returncode == 0 and sum(r["status"] == "done" for r in json.loads(listed.stdout)) == 2

    wait_for(child, two_done, "q0 and q1 were answered (q2 hangs)")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    if as_json:
        report = json.loads(out)  # one JSON object, as after Ctrl-C elsewhere (it printed nothing)
        assert report["interrupted"] and report["items"] == 2 and report["correct"] == 2
        assert report["cut_off"] == 1 and report["requests"] == 2  # q2's one request hangs: sent, not yet answered
    else:
        assert "quiz on quiz.jsonl: interrupted after 2 item(s)" in " ".join(out.split()), out
    assert err.strip().splitlines()[-1] == ("error: interrupted; finished calls are saved: the same command with "
                                            "--resume goes on with this evaluation")


def quiz_workflow(tmp_path: Path, url: str, settings: str = "") -> Path:
    """A data-set workflow over three questions: step a answers, step b checks a's answer."""
    write_pool(tmp_path, url)
    (tmp_path / "quiz.jsonl").write_text("".join(
        f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(3)))
    return write(tmp_path, "name: quiz\npool: pool.yaml\ninputs:\n  question: {type: string}\n"
                           f"dataset: {{path: quiz.jsonl}}\n{settings}steps:\n  - id: a\n    agent: alpha-expert\n"
                           "    prompt: '{{ inputs.question }}'\n  - id: b\n    needs: [a]\n    agent: beta-expert\n"
                           "    prompt: 'Check: {{ steps.a.output }}'\n")


def test_resume_goes_on_after_the_budget_is_raised_in_the_workflow_itself(loopback, tmp_path: Path) -> None:
    """The budget stop's advice, raise ``budget.max_calls`` in the workflow and run it again with
    --resume, keeps the finished work: a budget, a comment or a data-set limit is no other workflow."""
    server = loopback(ScriptedLLM().handler())
    path = quiz_workflow(tmp_path, server.url, "budget: {max_calls: 3}\n")
    stopped = cli("run", str(path))
    assert stopped.returncode == 3 and len(server.requests) == 2, stopped.stderr  # q0's a and b; q1 not started
    assert "raise budget.max_calls in the workflow" in stopped.stderr and "--resume" in stopped.stderr
    path.write_text("# budget raised after a stop\n" + path.read_text().replace(
        "budget: {max_calls: 3}", "budget:\n  max_calls: 10").replace(
        "dataset: {path: quiz.jsonl}", "dataset: {path: quiz.jsonl, limit: 3}"))
    done = cli("run", str(path), "--resume", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # the first item finished (runs start while the budget can finish them); the third sent nothing
    assert (report["resumed"], report["reused"], report["correct"], len(server.requests)) == (2, 1, 3, 6)


def test_run_resume_goes_on_with_a_data_set_workflows_evaluation(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    path = quiz_workflow(tmp_path, server.url)

    warned: list[str] = []

    def evaluate(*flags: str) -> tuple[dict[str, Any], int]:
        sent = len(server.requests)
        done = cli("run", str(path), "--json", *flags)
        assert done.returncode in (0, 3), done.stderr
        warned.append(done.stderr)
        return json.loads(done.stdout), len(server.requests) - sent

    nothing = ("warning: resume found no earlier run of this evaluation (the same workflow, inputs, settings and "
               "pool) to go on with: every item runs")
    first, sent = evaluate("--max-calls", "3")  # item 1's a and b; the rest are not started (2 calls each)
    assert (first["items"], first["failed"], first["correct"], sent) == (3, 2, 1, 2)
    assert "max_calls" in first["budget_exceeded"]  # the report says what stopped it
    resumed, sent = evaluate("--resume", "--max-calls", "10")
    assert (resumed["resumed"], resumed["reused"], resumed["correct"], sent) == (2, 1, 3, 4)  # only what is missing
    again, sent = evaluate("--resume")
    assert (again["reused"], again["correct"], sent) == (3, 3, 0)  # nothing is sent again
    path.write_text(path.read_text().replace("Check: ", "Verify: "))
    assert nothing not in warned[-1]
    edited, sent = evaluate("--resume")
    assert (edited["reused"], edited["resumed"], sent) == (0, 0, 6)  # another workflow text: every item runs
    assert nothing in warned[-1]  # said, not silently paid for again
    assert evaluate("--resume", "--k", "2")[0]["reused"] == 0  # other settings: other runs
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool.read_text().replace("model: alpha\n", "model: alpha-2\n", 1))  # another model behind alpha
    assert evaluate("--resume", "--k", "2")[0]["reused"] == 0  # (its answers were reused)
    path.write_text(path.read_text().replace("dataset: {path: quiz.jsonl}", "dataset: {path: quiz.jsonl, limit: 2}"))
    assert evaluate("--max-calls", "1")[1] == 1  # stopped at once; then evaluated afresh:
    limited, sent = evaluate()
    assert (limited["items"], sent) == (2, 4)  # the first two items, each with its two steps
    assert evaluate("--resume")[1] == 0  # each item's latest run counts (not the stopped one before it)
    single = cli("run", str(write(tmp_path, "name: one\npool: pool.yaml\nsteps:\n  - id: a\n    prompt: x\n",
                                  "one.yaml")), "--resume")
    # (a workflow without a data set: --resume finishes its latest unfinished run; this one has none)
    assert single.returncode == 2 and "error: no run of workflow 'one' (" in single.stderr, single.stderr


def test_a_plan_auto_workflow_plans_even_where_the_orchestra_does_not(tmp_path: Path) -> None:
    """``plan: auto`` asks the planner although the Orchestra's settings turn planning off (its
    data-set runs the same way)."""
    pool, models = scripted_pool(2, plan=plan_json(("facts", []), ("brief", ["facts"])))
    text = ("name: auto\npool:\n  models: {m: {type: openai, model: x}}\n  agents: [{name: a, model: m}]\n"
            "plan: auto\ntask: 'Brief on {{ inputs.topic }}'\ninputs:\n  topic: {type: string}\n")
    flow = Workflow.load(write(tmp_path, text), pool=pool)
    result = run_workflow(flow, {"topic": "tides"}, orchestra=Orchestra(pool, plan=False, k=1))
    assert result.status == "done", result.error
    assert [n.id for n in result.plan.nodes] == ["facts", "brief"]
    assert sum(kind_of(r) == "plan" for r in models["planner"].requests) == 1


def test_a_planned_step_named_like_a_dict_method_is_renamed_so_final_can_loop(tmp_path: Path) -> None:
    """A step's name comes before the dict's method in a template: a planner that named its steps
    items and get broke a final that loops with steps.items(), after every step was paid for."""
    pool, _ = scripted_pool(2, plan=plan_json(("items", []), ("get", ["items"])))
    text = ("name: auto\npool:\n  models: {m: {type: openai, model: x}}\n  agents: [{name: a, model: m}]\n"
            "plan: auto\ntask: 'Brief on tides'\n"
            "final: \"{% for id, step in steps.items() %}[{{ id }}]{% endfor %}\"\n")
    result = run_workflow(Workflow.load(write(tmp_path, text), pool=pool), {}, orchestra=Orchestra(pool, k=1))
    assert result.status == "done", result.error
    assert [n.id for n in result.plan.nodes] == ["items-step", "get-step"]
    assert result.plan.nodes[1].depends_on == ["items-step"] and result.answer == "[items-step][get-step]"


@pytest.mark.parametrize("final, sent", [
    ("'{{ steps.summary.output }}'", 0),  # fails once planned, before the steps are paid for
    ("'{{ steps.get(\"summary\") or steps.brief.output }}'", 2),  # reads it only where it is there
    ("'{% if steps.summary is defined %}x{% else %}{{ steps.brief.output }}{% endif %}'", 2),
])
def test_a_plan_auto_final_reading_a_step_the_plan_lacks_fails_before_the_steps(tmp_path: Path, final: str,
                                                                                   sent: int) -> None:
    pool, models = scripted_pool(2, plan=plan_json(("facts", []), ("brief", ["facts"])))
    text = ("name: auto\npool:\n  models: {m: {type: openai, model: x}}\n  agents: [{name: a, model: m}]\n"
            f"plan: auto\ntask: 'Brief on {{{{ inputs.topic }}}}'\ninputs:\n  topic: {{type: string}}\nfinal: {final}\n")
    flow = Workflow.load(write(tmp_path, text), pool=pool)
    result = run_workflow(flow, {"topic": "tides"}, orchestra=Orchestra(pool, k=1))
    assert sum(len(models[m].requests) for m in ("m0", "m1")) == sent
    if sent:
        assert result.status == "done", result.error
        assert result.answer == "m1: The answer is 1"
    else:
        assert result.status == "failed" and result.user_error
        assert result.error == (f"cannot render {tmp_path / 'wf.yaml'}: final: it reads steps.summary, but the plan "
                                "has no step 'summary' (its steps: facts, brief); with plan: auto, read the steps in a "
                                "loop (steps.items()) or write the steps out")


def test_a_sandbox_refusal_reads_as_one_clause_before_its_advice() -> None:
    """Jinja's sentence ends in a period, and the advice after it read "is unsafe.; fix the workflow"."""
    from orchestra.prompts import render_string

    with pytest.raises(ConfigError) as refused:
        render_string("{{ x.__class__ }}", where="wf.yaml: step 'a'", x="text")
    assert str(refused.value) == "cannot render wf.yaml: step 'a': access to attribute '__class__' of 'str' object is unsafe"


def test_run_refuses_a_recruiting_flag_the_workflows_mode_would_not_use(tmp_path: Path) -> None:
    """--competence-weight beside a workflow of `mode: random` was accepted and dropped (ask refused it)."""
    path = write(tmp_path, "settings: {mode: random}\n" + GOOD)
    refused = cli("run", str(path), "-i", "topic=tides", "--no-store", "--competence-weight", "2")
    assert (refused.returncode, refused.stderr.splitlines()[0]) == (
        2, "error: --competence-weight (recruit.competence_weight) weighs the Symbolic-MoE draw; random recruiting "
           "does not use it: leave it out, or use --mode symbolic-moe (see python -m orchestra run --help)")


def test_a_dashed_step_id_read_with_a_dot_is_refused_with_the_form_that_works(tmp_path: Path) -> None:
    """``steps.a-b.output`` is ``steps.a`` minus ``b.output`` to Jinja: the error said "unknown template
    variable 'b'; use ... steps.<id>.output", what the user had written. It names the bracket form."""
    dashed = GOOD.replace("id: draft", "id: first-draft").replace("needs: [draft]", "needs: [first-draft]")
    with pytest.raises(ConfigError, match=r'steps\.first-draft reads as steps\.first minus draft: '
                                          r'write steps\["first-draft"\]\.output$'):
        Workflow.load(write(tmp_path, dashed.replace("steps.draft.output", "steps.first-draft.output")))
    fixed = dashed.replace("{{ steps.draft.output }}", "{{ steps['first-draft'].output }}")
    assert [step.id for step in Workflow.load(write(tmp_path, fixed)).spec.steps] == ["first-draft", "review"]


def test_a_data_set_workflow_resends_only_its_failed_calls_with_resume_retry_failed(loopback, tmp_path: Path) -> None:
    """`run --resume` of a data-set workflow whose runs finished with failed calls sent nothing (the same
    degraded report), there was no `--retry-failed` as `eval` has, and the warning said to evaluate again:
    every paid call sent again."""
    from test_cli import _failing_beta

    scripted, broken = ScriptedLLM(), [True]
    server = loopback(chat_handler(_failing_beta(scripted, broken)))
    pool = write_pool(tmp_path, server.url)
    (tmp_path / "quiz.jsonl").write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n'
                                                 for i in range(2)))
    path = write(tmp_path, f"name: quiz\npool: {pool}\ninputs:\n  question: {{type: string}}\n"
                           "dataset: {path: quiz.jsonl}\nsteps:\n  - id: answer\n"
                           "    prompt: '{{ inputs.question }}'\n    recruit: {k: 3, mode: global}\n"
                           "    aggregate: synthesize\n")
    first = cli("run", str(path), "--json")
    assert first.returncode == 0 and json.loads(first.stdout)["failed_calls"] == 2, first.stderr
    assert ("the same command with --resume --retry-failed sends only those calls again" in first.stderr
            and "evaluate again" not in first.stderr), first.stderr
    broken[0] = False
    sent, scripted.prompts = len(server.requests), []
    plain = cli("run", str(path), "--resume", "--json")  # (finished runs are counted: nothing sent)
    assert json.loads(plain.stdout)["failed_calls"] == 2 and len(server.requests) == sent, plain.stderr
    retried = cli("run", str(path), "--resume", "--retry-failed", "--json")
    report = json.loads(retried.stdout)
    assert retried.returncode == 0 and retried.stderr == "", retried.stderr
    # per item: beta's expert call, and the aggregator's, whose request now holds beta's answer; nothing else
    assert sorted(kind for kind, _ in scripted.prompts) == ["aggregate", "aggregate", "expert", "expert"]
    assert len(server.requests) - sent == 4
    assert (report["failed_calls"], report["retried"], report["reused"], report["resumed"]) == (0, 2, 0, 0)
    runs = json.loads(cli("runs", "--json").stdout)
    assert len(runs) == 2 and {run["failed_calls"] for run in runs} == {0}
    assert report["requests"] == sum(run["requests"] for run in runs) == len(server.requests)
    sent = len(server.requests)
    again = cli("run", str(path), "--resume", "--retry-failed", "--json")  # nothing failed now: nothing sent
    assert json.loads(again.stdout)["reused"] == 2 and len(server.requests) == sent, again.stderr
    for argv, said in ((("--retry-failed",), "--retry-failed sends an earlier evaluation's failed calls again: add "
                                              "--resume"),):
        refused = cli("run", str(path), *argv)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    single = write(tmp_path, f"name: one\npool: {pool}\nsteps:\n  - id: a\n    prompt: hi\n", name="one.yaml")
    refused = cli("run", str(single), "--resume", "--retry-failed")
    assert refused.returncode == 2 and "`orchestra resume RUN_ID --retry-failed`" in refused.stderr, refused.stderr


def test_a_data_set_workflow_resume_whose_runs_another_process_runs_says_to_wait_for_it(loopback,
                                                                                        tmp_path: Path) -> None:
    """As `eval --resume` says: it advised `orchestra resume ITEM_RUN --force`, one item's run, not the
    workflow's evaluation, and --force is refused while that process lives."""
    import os
    import socket
    import sqlite3
    import time

    server = loopback(ScriptedLLM().handler())
    path = quiz_workflow(tmp_path, server.url, "budget: {max_calls: 3}\n")
    stopped = cli("run", str(path))
    assert stopped.returncode == 3, stopped.stderr
    with sqlite3.connect(default_store_path()) as db:  # one run of it goes on in another live process (this one)
        db.execute("UPDATE runs SET status='running', owner=?, updated=? WHERE id=(SELECT id FROM runs "
                   "WHERE status != 'done' LIMIT 1)", (f"{socket.gethostname()} pid {os.getpid()}:beef", time.time()))
    asked = len(server.requests)
    refused = cli("run", str(path), "--resume")
    assert refused.returncode == 2 and "is still running in another process" in refused.stderr, refused.stderr
    assert refused.stderr.strip().endswith("another evaluation is going on with this one's runs: wait for it to end "
                                           "(where its process is gone, its lease runs out within 30 s), then run "
                                           "this command again") and "--force" not in refused.stderr
    assert len(server.requests) == asked


RECORDED = """\
name: w
pool:
  name: p
  models:
    fast: {{type: openai, model: m, base_url: "http://127.0.0.1:9/v1", api_key_env: X}}
  defaults: {{model: fast}}
  agents:
    - {{name: a, persona: hi}}
inputs:
  {name}: {{type: string, default: cats}}
settings: {{seed: {seed}}}
steps:
  - id: s
    prompt: 'Say {{{{ inputs[{key}] }}}}'
"""


@pytest.mark.parametrize(("name", "seed", "key", "refused"), [
    ("topic", "010", '"topic"', "YAML reads 010 as 8"), ('"topic "', "8", '"topic "', "an input's name is given as")])
def test_a_run_recorded_before_a_check_was_added_still_loads_for_its_resume(tmp_path: Path, name: str, seed: str,
                                                                           key: str, refused: str) -> None:
    """A run's recorded workflow text may hold what is refused since (such a run still resumes): the
    checks of YAML 1.1 numbers and of input names refused it, so `orchestra resume` of a run begun
    before them failed."""
    text = RECORDED.format(name=name, seed=seed, key=key)
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=refused):  # (a file is checked)
        Workflow.load(path)
    Workflow.load(path, text=text, data=False)  # (a run's record is not)
