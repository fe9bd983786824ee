"""Numbers and choices the routing reports truthfully: skills read from what real keyword models
send, and votes that read every answer form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import scripted_pool
from loopback_llm import write_pool
from test_cli import cli

from orchestra import Orchestra
from orchestra.grading import AutoGrader, MultipleChoiceGrader
from orchestra.models import ChatResult
from orchestra.pipeline.aggregation import Response, vote
from orchestra.skills import SkillExtractor
from orchestra.testing import chat_handler


@pytest.mark.parametrize(("answer", "skills"), [
    ('{"keywords": ["chemistry", "physics"], "skills": ["biology"]}', ["chemistry", "physics"]),
    ('Here you go:\n```json\n{"skills": ["Organic Chemistry", "lab work"]}\n```', ["organic chemistry", "lab work"]),
    ('The relevant ones are {"topics": ["algebra"]} I think.', ["algebra"]),
    ('["geometry", "trigonometry"]', ["geometry", "trigonometry"]),
    ("Keywords: algebra, geometry.", ["algebra", "geometry"]),
    ('{"skills": ["chemistry', []),  # cut short: JSON syntax never becomes a skill name
    ('{"keywords": [{"name": "x"}, "a very long keyword that goes on and on", "ok"]}', ["ok"]),
])
def test_keywords_are_read_from_what_real_models_send(answer: str, skills: list[str]) -> None:
    assert SkillExtractor().parse(ChatResult(text=answer)) == skills


def test_a_keyword_answer_with_an_extra_key_is_neither_repaired_nor_split(loopback, tmp_path: Path) -> None:
    def answer(request) -> str:
        if "school subjects or skills" in request.prompt:
            return json.dumps({"keywords": ["chemistry"], "skills": ["chemistry", "lab"]})
        return "The answer is 1"

    server = loopback(chat_handler(answer))
    pool = write_pool(tmp_path, server.url, models=("alpha",), agents=("second",))
    done = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    keyword_requests = [r for r in server.requests if "school subjects or skills" in r.prompt]
    assert len(keyword_requests) == 5  # one per sample: the extra key is no reason for a repair
    assert data["plan"]["nodes"][0]["skills"] == ["chemistry"]
    # read whole, and said: chemistry names none of the pool's skills (history, arithmetic, writing)
    assert data["usage"]["skill_extraction_failures"] == 1 and data["status"] == "done"
    assert "no skills found (its keywords (chemistry) name none of the pool's skills); recruited without skills" in cli(
        "ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1").stderr


def test_eval_counts_the_items_whose_keywords_match_no_profiled_skill(loopback, tmp_path: Path) -> None:
    """Chemistry items on a pool profiled for other subjects: each explanation said `no matched skill: overall
    accuracy`, and the report only "skill extraction failures", though every keyword call had answered."""
    def answer(request) -> str:
        if "school subjects or skills" in request.prompt:
            return json.dumps({"keywords": ["chemistry" if "pH" in request.prompt else "arithmetic"]})
        return "The answer is 7"

    server = loopback(chat_handler(answer))
    pool = write_pool(tmp_path, server.url, models=("alpha", "beta"))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": question, "answer": "7"}) + "\n" for i, question in
                            enumerate(["What is the pH of pure water?", "What is 3 + 4?", "The pH of salt water?"])))
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--method", "symbolic-moe", "--no-store")
    done = cli(*argv, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unmatched_skill_items"] == 2
    table = " ".join(cli(*argv).stdout.split())
    assert "│ items matching no profiled skill │ 2 (recruited on overall accuracy) │" in table, table
    moa = cli(*argv[:-3], "--method", "moa", "--no-store", "--json")  # (no skills asked for: none to match)
    assert json.loads(moa.stdout)["unmatched_skill_items"] == 0, moa.stderr
    bare = tmp_path / "bare.yaml"  # a pool with no skills at all: nothing to match, and the runs say nothing
    bare.write_text("\n".join(line for line in pool.read_text().splitlines() if "skills:" not in line))
    none = cli("eval", "--pool", str(bare), *argv[3:], "--json")
    assert none.returncode == 0 and json.loads(none.stdout)["unmatched_skill_items"] == 0, none.stderr


def test_failed_skill_extraction_is_reported(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: "I cannot help with that, sorry!\nTry again."
                                   if "school subjects or skills" in request.prompt else "The answer is 1"))
    pool = write_pool(tmp_path, server.url, models=("alpha",), agents=("second",))
    done = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1")
    assert done.stdout.strip() == "The answer is 1"  # the answer is kept ...
    assert done.returncode == 1, done.stderr  # ... but every keyword call failed: not a clean run
    assert "answer: warning: no skills found" in done.stderr and "recruited without skills" in done.stderr
    assert "partial: answer: skill extraction failed (all 5 keyword calls failed:" in done.stderr.splitlines()[-2]
    as_json = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1", "--json")
    assert json.loads(as_json.stdout)["usage"]["skill_extraction_failures"] == 1


def test_the_auto_grader_votes_letters_with_the_article_a() -> None:
    responses = [Response("x", "Because of this, the answer is (A)"), Response("y", "The answer is (A)."),
                 Response("z", "The answer is (B)")]
    assert vote(responses, AutoGrader()).answer == vote(responses, MultipleChoiceGrader()).answer == "A"
    numbers = [Response("x", "The answer is 12"), Response("y", "The answer is 12.0"), Response("z", "The answer is 7")]
    assert vote(numbers, AutoGrader()).answer == "12"
    words = [Response("x", "The answer is a cat"), Response("y", "The answer is the cat"), Response("z", "The answer is dog")]
    assert vote(words, AutoGrader()).answer == "cat"


def test_voting_through_a_run_picks_the_majority_letter() -> None:
    answers = {"m0": "The answer is (A)", "m1": "The answer is (A)", "m2": "The answer is (B)"}
    pool, _ = scripted_pool(3, expert=lambda name, request: answers[name])
    result = Orchestra(pool, k=3, mode="topk", aggregate="vote", store=False).run("Which option?", plan=False)
    assert result.answer == "The answer is (A)"


def test_grader_is_a_flag_of_ask_and_a_pool_setting(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: "The answer is (B)" if kind_of_prompt(request.prompt) == "expert"
                                   else '{"keywords": ["general"]}'))
    pool = write_pool(tmp_path, server.url, extra="settings: {grader: mc}\n")
    done = cli("ask", "Which option?", "--pool", str(pool), "--no-plan", "--aggregate", "vote", "--grader", "exact",
               "--json")
    assert done.returncode == 0, done.stderr
    bad = cli("ask", "Which option?", "--pool", str(pool), "--grader", "fuzzy")
    assert bad.returncode == 2 and "fuzzy" in bad.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(pool.read_text().replace("grader: mc", "grader: fuzzy"))
    refused = cli("agents", "--pool", str(broken))
    assert refused.returncode == 2 and "settings.grader" in refused.stderr


def kind_of_prompt(prompt: str) -> str:
    return "keywords" if "school subjects or skills" in prompt else "expert"


def test_pool_grader_setting_reaches_the_run() -> None:
    from orchestra.settings import Settings

    pool, _ = scripted_pool(2, settings=Settings(grader="mc", fast_path=False, plan_check=False))
    assert Orchestra(pool, store=False).stages.grader.name == "mc"
    assert Orchestra(pool, store=False, grader="numeric").stages.grader.name == "numeric"
