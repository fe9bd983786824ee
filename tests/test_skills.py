"""Skill extraction, matching, grading, data sets and profiling (on a simulated pool)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import single_agent_pool

from orchestra import Agent, Orchestra, Pool, RecruitConfig
from orchestra.datasets import Dataset, Item, load_dataset
from orchestra.errors import ConfigError, DatasetError
from orchestra.grading import AutoGrader, ExactMatchGrader, MultipleChoiceGrader, NumericGrader, get_grader
from orchestra.matching import EmbeddingMatcher, LexicalMatcher
from orchestra.models import ChatResult, FunctionModel
from orchestra.profile import SkillProfile, load_profiles
from orchestra.profiling import build_profiles, save_profiles
from orchestra.skills import KeywordConfig, SkillExtractor
from orchestra.testing import LoopbackRequest, Reply, chat_handler, embeddings_reply
from orchestra.testing.simulation import simulated_pool

# --- keyword extraction ------------------------------------------------------------------------


def result(text: str = "", parsed: object = None) -> ChatResult:
    return ChatResult(text=text, parsed=parsed)


def test_extractor_defaults_follow_the_paper() -> None:
    requests = SkillExtractor().requests("What is 2 + 2?", seed=10)
    assert len(requests) == 5
    assert {r.temperature for r in requests} == {0.7}
    assert [r.seed for r in requests] == [10, 11, 12, 13, 14]
    assert "What is 2 + 2?" in requests[0].prompt_text()


def test_keywords_normalised_filtered_and_kept_when_repeated() -> None:
    extractor = SkillExtractor()
    samples = [result(parsed={"keywords": ["Algebra ", "arithmetic", "a very very long keyword indeed"]}),
               result(parsed={"keywords": ["algebra", "ARITHMETIC", "algebra"]}),
               result(text="Keywords: algebra, number theory"),
               result(parsed={"keywords": ["geometry"]}),
               BadResponseLike()]
    assert extractor.combine(samples) == ["algebra", "arithmetic"]


class BadResponseLike(Exception):
    pass


def test_keyword_settings_are_configurable() -> None:
    extractor = SkillExtractor(KeywordConfig(samples=3, temperature=0.2, min_count=1, max_length=5,
                                             structured=False))
    requests = extractor.requests("q")
    assert len(requests) == 3 and requests[0].output == "text" and requests[0].temperature == 0.2
    assert extractor.combine([result("Keywords: logic, probability")]) == ["logic"]


def test_all_samples_go_to_the_keyword_model_as_one_batch() -> None:
    model = FunctionModel(lambda request: {"keywords": ["chemistry"]}, name="kw")
    pool = Pool(agents=[Agent(name="solo", model=model), Agent(name="duo", model=model)])
    result_ = Orchestra(pool, plan=False, k=1).run("What is the pH of pure water?")
    assert model.batches[0] == 5
    assert result_.node("answer").skills == ["chemistry"]


def test_a_pool_of_one_agent_asks_no_keyword_model_when_one_expert_is_wanted() -> None:
    """Its one team could not change with the skills: five keyword calls a task for nothing."""
    model = FunctionModel(lambda request: "The answer is 7", name="solo")
    result = Orchestra(single_agent_pool(model), plan=False, k=1).run("What is the pH of pure water?")
    assert model.batches == [1] and result.usage.calls == 1 and result.status == "done"
    assert result.node("answer").recruitment["explanation"][-1] == "solo: the pool's only agent"
    twice = FunctionModel(lambda request: {"keywords": ["chemistry"]} if request.wants_json else "The answer is 7",
                          name="solo")
    Orchestra(single_agent_pool(twice), plan=False, k=2).run("What is the pH of pure water?")
    assert twice.batches[0] == 5  # (two draws of one agent: its weights still come from the skills)


# --- matching ----------------------------------------------------------------------------------

VOCABULARY = ["algebra", "geometry", "organic chemistry", "python programming", "european history", "probability"]


def test_lexical_matcher_maps_to_nearest_skill_and_caches() -> None:
    matcher = LexicalMatcher()
    found = asyncio.run(matcher.match(["algebraic equations", "chemistry", "probabilities", "cooking"], VOCABULARY))
    assert [(m.keyword, m.skill) for m in found] == [("algebraic equations", "algebra"),
                                                     ("chemistry", "organic chemistry"),
                                                     ("probabilities", "probability")]
    assert matcher.nearest("chemistry", VOCABULARY) is matcher.nearest("chemistry", VOCABULARY)
    assert asyncio.run(matcher.match(["algebra"], VOCABULARY))[0].similarity == 1.0


POOL_SKILLS = ("arithmetic", "algebra", "geometry", "probability", "physics", "chemistry", "biology", "writing",
               "grammar", "summarization", "history", "geography", "general knowledge")


@pytest.mark.parametrize(("keyword", "skill"), [("grammatical", "grammar"), ("geometric", "geometry"),
                                                ("physical", "physics"), ("world history", "history"),
                                                ("probabilities", "probability"), ("knowledge", "general knowledge")])
def test_lexical_matcher_maps_a_words_other_forms_to_its_skill(keyword: str, skill: str) -> None:
    match = LexicalMatcher().nearest(keyword, POOL_SKILLS)
    assert match is not None and match.skill == skill


@pytest.mark.parametrize("keyword", ["programming", "biography", "photography", "calculation", "coding"])
def test_lexical_matcher_maps_no_keyword_to_a_skill_spelt_alike_only_inside_its_words(keyword: str) -> None:
    """A small model's usual keywords, "python, programming", sent every task to the writer: "programming"
    matched "grammar" (0.31 against a 0.3 threshold), "biography" "geography" (0.65), by the letters
    their words end with, not the ones they start with."""
    assert LexicalMatcher().nearest(keyword, POOL_SKILLS) is None


def test_embedding_matcher_over_a_loopback_embeddings_endpoint(loopback) -> None:
    axes = {"algebra": [1, 0, 0], "geometry": [0, 1, 0], "history": [0, 0, 1],
            "equations": [0.9, 0.1, 0], "triangles": [0.1, 0.9, 0.1], "pottery": [0.5, 0.5, 0.5]}

    def embeddings(request: LoopbackRequest) -> Reply:
        inputs = request.json()["input"]
        return Reply(body={"data": [{"index": i, "embedding": axes[t]} for i, t in enumerate(inputs)]})

    server = loopback(embeddings)
    matcher = EmbeddingMatcher(model="mini", base_url=server.url + "/v1", min_similarity=0.8)
    found = asyncio.run(matcher.match(["equations", "triangles", "pottery"], ["algebra", "geometry", "history"]))
    assert [(m.keyword, m.skill) for m in found] == [("equations", "algebra"), ("triangles", "geometry")]
    asyncio.run(matcher.match(["equations"], ["algebra", "geometry", "history"]))
    assert len(server.requests) == 1  # every text was cached after the first call
    assert server.requests[0].path == "/v1/embeddings"


def test_the_chat_handlers_server_answers_embeddings_too(loopback) -> None:
    """The README calls the loopback server an embeddings server too; ``chat_handler`` (and
    ``python -m orchestra.testing``) answered ``/embeddings`` with a chat completion."""
    server = loopback(chat_handler(lambda request: "never asked"))
    matcher = EmbeddingMatcher(model="mini", base_url=server.url + "/v1", min_similarity=0.6)
    found = asyncio.run(matcher.match(["Algebraic", "pottery"], ["algebra", "geometry", "history"]))
    assert [(m.keyword, m.skill) for m in found] == [("Algebraic", "algebra")]  # (shared spelling is near)
    assert [r.path for r in server.requests] == ["/v1/embeddings"]
    # the same text, the same vector, in another process too (python -m orchestra.testing serves from one)
    other = subprocess.run([sys.executable, "-c", "import json; from orchestra.testing import embeddings_reply; "
                            "print(json.dumps(embeddings_reply(['algebra']).body))"], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "1"})
    assert json.loads(other.stdout) == embeddings_reply(["algebra"]).body
    tokens = httpx.post(server.url + "/v1/embeddings", json={"model": "mini", "input": [101, 2023]}).json()
    assert len(tokens["data"]) == 1 and len(tokens["data"][0]["embedding"]) == 64  # (a text as token ids)


# --- grading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Let me think... The answer is (C).", "C"), ("answer: b", "B"), ("I pick (A) then (D)", "D"),
    ("<think>maybe (A)</think> The answer is (B)", "B"),
    ("The answer is (A) is tempting, but the answer is (C)", "C"),  # the last clause on a line counts
    ("The answer is (C). Option A is wrong because its answer is 4.", "C"),  # "its answer" is not the reply's
    ("**Answer**: D", "D"), ("Checked twice. Answer: (B)", "B"),
    ("The answer is a bit tricky, but it is (C).", "C"), ("My answer: I'd go with C.", "C"),  # words, not options
    ("The answer is, I'd say, (C).", "C"), ("The answer is C. A is wrong.", "C"),
    ("The best answer is A. Option B is wrong because it is 4.", "A"), ("Hence, Answer: C. The others fail, e.g. D.", "C"),
    ("A is tempting, but the answer is b, since 42 > 3", "B"), ("Answer: b) 42\nA would be wrong.", "B"),
])
def test_multiple_choice_extraction(text: str, expected: str) -> None:
    item = Item(id="1", question="q", answer=expected, choices=("w", "x", "y", "z"))
    assert MultipleChoiceGrader().extract(text, item) == expected
    assert MultipleChoiceGrader().grade(text, item)


def test_a_json_answer_is_graded_on_its_answer_field_or_its_one_field() -> None:
    """A data-set workflow step with an `output:` schema answered `{"answer": "A"}`: every right answer
    was graded wrong (the letter inside the JSON was never read)."""
    choice = Item(id="1", question="q", answer="A", choices=("x", "y"))
    number = Item(id="2", question="q", answer="42")
    grader = AutoGrader()
    assert grader.grade('{"answer": "A"}', choice) and grader.grade('{\n  "Answer": "The answer is (A)"\n}', choice)
    assert not grader.grade('{"answer": "B"}', choice)
    assert grader.grade('{"value": 42}', number) and grader.grade('{"answer": 42, "why": "six sevens"}', number)
    assert not grader.grade('{"low": 41, "high": 42}', number)  # (no answer field: the whole object)
    assert grader.grade("The answer is 42", number)  # (text as before)
    as_json = Item(id="3", question="q", answer='{"city": "Paris", "country": "FR"}')  # a JSON reference: alike
    assert grader.grade('{"country": "FR", "city": "Paris"}', as_json)
    assert not grader.grade('{"country": "FR", "city": "Lyon"}', as_json)


def test_multiple_choice_reference_given_as_choice_text() -> None:
    item = Item(id="1", question="q", answer="Paris", choices=("Rome", "Paris"))
    assert MultipleChoiceGrader().grade("The answer is (B)", item)
    # a one-letter text is the choice's, not that letter ("y" of x, y, z was read as the letter Y)
    short = Item(id="2", question="q", answer="y", choices=("x", "y", "z"))
    assert MultipleChoiceGrader().grade("The answer is (B)", short)
    assert not MultipleChoiceGrader().grade("The answer is (C)", short)
    # repeated choices the answer is not one of leave nothing to doubt: kept
    assert Item(id="3", question="q", answer="C", choices=("4", "4", "5")).choices == ("4", "4", "5")


@pytest.mark.parametrize("text, reference", [
    ("\\boxed{1,000}", "1000"), ("The answer is 2.50", "2.5"), ("so x = \\frac{1}{2}", "0.5"),
    ("The answer is $12", "12"), ("first 3 then finally 7", "7"), ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("The answer is 50%", "50"), ("The answer is 63 (from 100 - 37).", "63"),
    ("The answer is 12. Check: 7 + 5 = 12 in 1 step", "12"), ("The answer is 42 (m1)", "42"),
    ("I think the answer is 5, not 6.\nFinal answer: 8 (after checking 2 cases)", "8"),
    ("At first I thought the answer is 5, but the answer is 7.", "7"),
    ("The answer is 4 because the answer: 9", "9"), ("The answer is 6. Final answer:", "6"),
    ("The answer is 12; option B is off since their answer is 15.", "12"), ("**Final answer:** 21", "21"),
    ("Our answer is 42. It is not 43.", "42"), ("So, answer is 17. Because 10 + 7 = 17 and not 18", "17"),
    ("The answer is approx. 3.14, rounded from 3.14159", "3.14"),  # ("approx." ends no sentence)
])
def test_numeric_grading_normalises(text: str, reference: str) -> None:
    assert NumericGrader().grade(text, Item(id="1", question="q", answer=reference))


@pytest.mark.parametrize("text", ["The answer is 3–5", "The answer is 3-5 days", "The answer is 3 or 4",
                                  "The answer is 3, or maybe 4", "The answer is about 3 to 5",
                                  "The answer is between 3 and 5", "The answer is 3 (or 4)", "The answer is 3 ~ 5"])
def test_a_hedged_numeric_answer_gets_no_credit(text: str) -> None:
    """A range or a choice of numbers is no one answer: its first number got the credit."""
    assert not NumericGrader().grade(text, Item(id="1", question="q", answer="3"))
    assert not AutoGrader().grade(text, Item(id="1", question="q", answer="3"))


@pytest.mark.parametrize("text, reference", [
    ("The answer is 0.5 or 1/2.", "0.5"), ("The answer is 4 or 4.0", "4"), ("The answer is $12, or $12.00", "12"),
    ("The answer is 18, and 18 is divisible by 3.", "18"), ("The answer is 1969-07-20", "1969"),
    ("The answer is 3-4-5 triangle", "3"), ("The answer is 7 - 3 is wrong", "7"), ("The answer is 1000 or 10^3", "1000"),
    ("The answer is 1,000 or so", "1000"), ("The answer is 5 and 7/8", "47/8"), ("The answer is 3 and 1/2 cups", "3.5"),
])
def test_an_answer_restated_or_continued_keeps_its_credit(text: str, reference: str) -> None:
    """One answer written twice ("0.5 or 1/2"), or followed by a sentence that reuses it, is no hedge."""
    assert NumericGrader().grade(text, Item(id="1", question="q", answer=reference))


def test_an_answer_clause_ends_with_its_sentence() -> None:
    paris, letter = Item(id="1", question="q", answer="Paris"), Item(id="2", question="q", answer="C")
    assert AutoGrader().grade("The answer is Paris. It is the capital of France.", paris)
    assert AutoGrader().grade("The answer is (C). Option A is wrong because its answer is 4.", letter)
    assert NumericGrader().extract("The answer is 2.5; it is half of 5.") == "5/2"  # (a decimal point goes on)
    assert not AutoGrader().grade("The answer is Lyon. Paris is the capital.", paris)
    for name in ("Mt. Everest", "J. K. Rowling", "E. coli", "Dr. Watson"):  # a stop that ends no sentence
        assert AutoGrader().grade(f"The answer is {name}. It is well known.", Item(id="3", question="q", answer=name))
    # in a vote (no item) initials are a name, not an option: these two disagree
    assert AutoGrader().extract("The answer is J. K. Rowling.") != AutoGrader().extract("The answer is J. R. R. Tolkien.")
    assert AutoGrader().extract("The answer is C. A is wrong.") == "C"


def test_numeric_wrong_and_missing() -> None:
    grader = NumericGrader()
    assert not grader.grade("The answer is 13", Item(id="1", question="q", answer="12"))
    assert not grader.grade("no number here", Item(id="1", question="q", answer="12"))


def test_a_unicode_minus_sign_is_a_minus() -> None:
    """Models write "\u22125" (U+2212): it was read as 5, so a wrong answer was graded right."""
    grader, auto = NumericGrader(), AutoGrader()
    assert not auto.grade("The answer is \u22125.", Item(id="1", question="q", answer="5"))
    assert auto.grade("The answer is \u22125.", Item(id="1", question="q", answer="-5"))
    assert auto.grade("The answer is -5.", Item(id="1", question="q", answer="\u22125"))  # a reference written so
    assert grader.extract("\\boxed{\uff0d3/4}") == "-3/4"  # (the fullwidth one)
    for written in ("\u2212 5", "\u20135", "\u20125", "\u2212\u20095"):  # a space after it, an en or figure dash
        assert not auto.grade(f"The answer is {written}.", Item(id="1", question="q", answer="5")), written
    assert grader.extract("between 3\u20135") == "5"  # (a range, not 3 and -5)


def test_exact_match_and_auto_choice() -> None:
    assert ExactMatchGrader().grade("The answer is: The Eiffel Tower.", Item(id="1", question="q", answer="eiffel tower"))
    echoed = "You asked: end with 'The answer is N'. The answer is Paris"  # the question's own clause comes first
    assert ExactMatchGrader().grade(echoed, Item(id="1", question="q", answer="Paris"))
    auto = AutoGrader()
    assert auto.pick(Item(id="1", question="q", answer="B", choices=("a", "b"))).name == "mc"
    assert auto.pick(Item(id="1", question="q", answer="3/4")).name == "numeric"
    assert auto.pick(Item(id="1", question="q", answer="Paris")).name == "exact"
    assert get_grader("numeric").name == "numeric"
    with pytest.raises(Exception, match="unknown grader 'fuzzy'"):
        get_grader("fuzzy")


# --- data sets ---------------------------------------------------------------------------------


def test_dataset_loads_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text('{"id": 1, "question": "2+2?", "answer": 4}\n\n'
                    '{"id": "b", "question": "Pick", "answer": "A", "choices": ["x", "y"], "category": "misc"}\n')
    data = load_dataset(path)
    assert len(data) == 2 and data.items[0].id == "1" and data.items[0].answer == "4"
    assert len(data.sha256) == 64 and data.items[1].prompt() == "Pick\n(A) x\n(B) y"
    marked = tmp_path / "bom.jsonl"  # a byte-order mark first, as some editors write: not part of line 1
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    again = load_dataset(marked)
    assert again.items == data.items and again.sha256 != data.sha256  # (the hash is of the file's bytes)
    open_question = tmp_path / "table.jsonl"  # a table's export: every row has a choices column, empty if open
    open_question.write_text('{"id": 1, "question": "2+2?", "answer": 4, "choices": []}\n')
    assert load_dataset(open_question).items[0].choices is None
    written = tmp_path / "numbers.jsonl"  # an id or answer is the number as written (read as a float: 'inf', digits lost)
    written.write_text('{"id": 1e999, "question": "q", "answer": 123456789012345678901234567890.0, "rank": 2.5}\n'
                       '{"id": 2e999, "question": "r", "answer": 0.30000000000000000000001, "rank": 3}\n'
                       '{"id": 3, "question": "s", "answer": ' + "9" * 5000 + '}\n')
    first, second, third = load_dataset(written).items
    assert (first.id, first.answer, second.id, second.answer) == (
        "1e999", "123456789012345678901234567890.0", "2e999", "0.30000000000000000000001")
    assert third.answer == "9" * 5000 and (first.model_extra, second.model_extra) == ({"rank": 2.5}, {"rank": 3})
    assert NumericGrader().grade("The answer is 123456789012345678901234567890", first)
    separated = tmp_path / "separated.jsonl"  # U+2028 is plain text to JSON (str.splitlines cut the line there)
    separated.write_text('{"id": 1, "question": "2+2?\u2028Show work.\u0085", "answer": 4}\r\n{"id": 2, '
                         '"question": "3+3?", "answer": 6}\r\n', encoding="utf-8")
    assert [item.question for item in load_dataset(separated).items] == ["2+2?\u2028Show work.\u0085", "3+3?"]


def test_a_csv_data_set_is_told_to_be_json_lines(tmp_path: Path) -> None:
    # (it was "data.csv:1: not valid JSON (Expecting value)", which did not say what a data set is)
    data = tmp_path / "data.csv"
    data.write_text("id,question,answer\n1,What is 2+2?,4\n")
    with pytest.raises(DatasetError) as refused:
        load_dataset(data)
    assert str(refused.value) == (f"{data}:1: not valid JSON (Expecting value); a data set is JSON Lines, one object "
                                  'per line such as {"id": "q1", "question": "...", "answer": "..."}, and a CSV file '
                                  "is not: convert it")
    plain = tmp_path / "plain.txt"  # (any file whose first line is not JSON at all)
    plain.write_text("What is 2+2?\n")
    with pytest.raises(DatasetError, match=r"plain.txt:1: .*JSON Lines.*, and this file is not: convert it$"):
        load_dataset(plain)
    broken = tmp_path / "broken.jsonl"  # (an object gone wrong is not told what JSON Lines are)
    broken.write_text('{"id": 1, "question": "q" "answer": 1}\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:1: not valid JSON \(Expecting ',' delimiter\)$"):
        load_dataset(broken)


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "question": "q", "answer": 1}\nnot json\n', "val.jsonl:2: not valid JSON"),
    ('{"id": 1, "answer": 1}\n', "val.jsonl:1: field 'question': missing"),
    ('{"id": 1, "question": "q", "answer": 1}\n{"id": 2, "question": "  ", "answer": 1}\n',
     "val.jsonl:2: field 'question': the question is empty"),
    # (refused by the run, naming no item: the user could not find the row)
    ('{"id": 1, "question": "q", "answer": 1}\n{"id": 2, "question": "\\u200b\\u0000", "answer": 1}\n',
     "val.jsonl:2: field 'question': the question has no visible character (only spaces, control characters such "
     "as NUL and format characters such as a zero-width space)"),
    ('[1, 2]\n', "val.jsonl:1: each line must be a JSON object"),
    # (two files joined: the second's mark was Python's "Unexpected UTF-8 BOM (decode using utf-8-sig)")
    ('{"id": 1, "question": "q", "answer": 1}\n\ufeff{"id": 2, "question": "q", "answer": 1}\n',
     "val.jsonl:2: the line begins with a byte-order mark (U+FEFF; files joined with cat?): remove it"),
    # (a JSON array got no hint, where a CSV file gets one)
    ('[{"id": 1, "question": "q", "answer": 1}]\n', "val.jsonl:1: each line must be a JSON object; this is a JSON "
     "array: a data set is JSON Lines, each object on a line of its own"),
    ('[\n  {"id": 1, "question": "q", "answer": 1}\n]\n', "val.jsonl:1: not valid JSON (Expecting value); this is "
     "a JSON array: a data set is JSON Lines, each object on a line of its own"),
    ('[{"id": 1, "question": "q", "answer": 1},\n {"id": 2, "question": "q", "answer": 1}]\n',
     "val.jsonl:1: not valid JSON (Expecting value); this is a JSON array: a data set is JSON Lines"),
    ('{"id": 1, "question": "q", "answer": 1, "categroy": "math"}\n',
     "val.jsonl:1: unknown field 'categroy' (did you mean 'category'?); a field of another name is kept as it is, "
     "not read as 'category'"),
    # another data set's name for a field: the choices were never shown, the letter still graded
    ('{"id": 1, "question": "q", "options": ["sky", "blood"], "answer": "B"}\n',
     "val.jsonl:1: unknown field 'options' (did you mean 'choices'?)"),
    ('{"id": 1, "question": "q", "target": 4}\n', "val.jsonl:1: unknown field 'target' (did you mean 'answer'?)"),
    ('{"id": 1, "question": "q", "answer": 1}\r{"id": 2, "question": "q", "answer": 1}\r',
     "val.jsonl:1: not valid JSON (Extra data); its lines end at CR alone (an old Mac's line endings): save it with "
     "LF (or CR LF) endings"),
    ('{"id": "a", "question": "q", "answer": 1}\n{"id": "a ", "question": "r", "answer": 2}\n',
     "val.jsonl:2: duplicate id 'a' (first on line 1)"),
    ('{"id": 1, "question": "q", "anwser": 1}\n', "val.jsonl:1: unknown field 'anwser' (did you mean 'answer'?)"),
    ('{"id": 1, "question": ' + "[" * 5000 + "]" * 5000 + ', "answer": 1}\n',
     "val.jsonl:1: JSON nested too deeply to read"),  # (not Python's RecursionError)
    ('{"id": 1, "question": "q", "answer": 1}\n{"id": 1, "question": "r", "answer": 2}\n',
     "val.jsonl:2: duplicate id '1' (first on line 1)"),
    ("\n", "val.jsonl: the data set has no items"),
    ('{"id": " ", "question": "q", "answer": 1}\n', "val.jsonl:1: field 'id': the id is empty"),
    ('{"id": "a", "question": "q", "answer": 1, "id": "b"}\n', "val.jsonl:1: field 'id' is given twice; keep one"),
    ('{"id": 1, "question": "q", "answer": "E", "choices": ["a", "b"]}\n',
     "val.jsonl:1: field 'choices': the answer 'E' is neither a letter of its 2 choices (A-B) nor the text of one"),
    # (answered "y", choices x, y, y could never be graded right: (B) and (C) both read wrong)
    ('{"id": 1, "question": "q", "answer": "y", "choices": ["x", "y", "y"]}\n',
     "val.jsonl:1: field 'choices': the answer 'y' is the text of choices B and C; give the letter of the right one"),
    # (answered B of choices 4, 4, 5: an expert choosing (A) gave the same answer and was graded wrong)
    ('{"id": 1, "question": "q", "answer": "B", "choices": ["4", "4 ", "5"]}\n',
     "val.jsonl:1: field 'choices': the answer B is a choice whose text is also choice A's; make the choices differ"),
    ('{"id": 1, "question": "q", "answer": "A", "choices": ["Paris", "paris", "Rome"]}\n',
     "val.jsonl:1: field 'choices': the answer A is a choice whose text is also choice B's; make the choices differ"),
    ('{"id": 1, "question": "q", "answer": "a", "choices": ["b", "a"]}\n',
     "val.jsonl:1: field 'choices': the answer 'a' is both the letter A and the text of choice B; give the letter of "
     "the right choice"),
    ('{"id": 1, "question": "q", "answer": "A", "choices": ' + json.dumps([f"c{i}" for i in range(11)]) + '}\n',
     "val.jsonl:1: field 'choices': 11 choices; at most 10 (A-J), the letters answers are read in"),
    ('{"id": 1, "question": "caf\\u00e9 \\ud83d\\ude00", "answer": 1}\n{"id": 2, "question": "q\\ud800", "answer": 1}\n',
     "val.jsonl:2: field 'question' holds a lone surrogate"),  # (line 1's escapes are whole characters)
    ('{"id": 1, "question": "q", "answer": "  "}\n', "val.jsonl:1: field 'answer': the answer is empty"),
    ('{"id": 1, "question": "q", "answer": NaN}\n',  # (Python's json reads it, and the answer was "nan")
     "val.jsonl:1: NaN is not JSON; write it as a string, in quotes"),
    ('{"id": 1, "question": "q", "answer": 1, "rank": ' + "9" * 5000 + '}\n',  # (Python's ValueError, as a traceback)
     "val.jsonl:1: a number too long to read (Exceeds the limit (4300 digits) for integer string conversion); write "
     "it as a string, in quotes"),
    ('{"id": 1, "question": "' + "x" * 500_001 + '", "answer": 1}\n',  # (eval refused it naming no file or line)
     "val.jsonl:1: field 'question': the question is 500,001 characters; at most 500,000 fit Orchestra's prompts"),
    ('{"id": 1, "question": "q", "answer": "A", "choices": ["x", " "]}\n', "val.jsonl:1: field 'choices': choice B is empty"),
    ('{"id": 1, "question": "q", "answer": 1}\n{"id": 2, "question": "caf\xe9?", "answer": 1}\n'.encode("latin-1"),
     "val.jsonl:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"),  # (not read as another question)
    (b"\xef\xbb\xbf" + '{"id": 1, "question": "q", "answer": 1}\n{"id": 2, "question": "a\xe9\\n", "answer": 1}\n'
     .encode("latin-1"), "val.jsonl:2: not UTF-8 text (byte 0xe9)"),  # after a byte-order mark, still the right byte
])
def test_bad_rows_name_file_and_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "val.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --- profiling ---------------------------------------------------------------------------------


def test_profiles_measure_skills_and_carry_provenance(tmp_path: Path) -> None:
    sim = simulated_pool(seed=0)
    pool = sim.pool()
    progress: list[tuple[str, int, int]] = []
    report = build_profiles(pool, sim.items(10), progress=lambda *p: progress.append(p))
    assert set(report.profiles) == set(sim.agents)
    for agent, prof in report.profiles.items():
        best_skill = max(sim.skills, key=lambda s: sim.accuracy[agent][s])
        assert prof.skills[best_skill] == max(prof.skills[s] for s in sim.skills)
        assert prof.provenance.items == 80 and prof.provenance.dataset_sha256 == sim.items(10).sha256
        assert set(prof.provenance.prompt_sha256) == {"keywords.j2", "expert.j2", "aggregator.j2"}
        assert prof.provenance.model == f"FunctionModel:{agent}"
        assert prof.aggregation_score is not None
    assert sum(p.competence for p in report.profiles.values()) == pytest.approx(1.0)
    stages = {stage for stage, _, _ in progress}
    assert stages == {"keywords", "answers", "aggregation"}
    assert ("answers", 480, 480) in progress
    # every agent's items went to its model in one batch
    assert all(len(a.model.batches) >= 1 and a.model.batches[0] == 80 for a in pool.agents)
    written = save_profiles(report, tmp_path / "profiles")
    assert len(written) == 6
    loaded = load_profiles(tmp_path / "profiles")
    assert loaded["expert0"] == report.profiles["expert0"].model_copy(
        update={"skills": loaded["expert0"].skills})
    assert json.loads(written[0].read_text())["provenance"]["items"] == 80
    assert SkillProfile.load(written[0]).agent in sim.agents


def test_recruited_experts_beat_the_best_single_agent_near_the_oracle() -> None:
    sim = simulated_pool(seed=1)
    pool = sim.pool()
    pool.profiles = build_profiles(pool, sim.items(25)).profiles
    held_out = sim.items(25, offset=500)
    grader = AutoGrader()
    skills_only = RecruitConfig(competence_weight=0)
    orc = Orchestra(pool, mode="topk", k=1, aggregate="none", plan=False, recruit=skills_only, store=False)
    results = orc.run_many([item.prompt() for item in held_out])
    recruited = sum(grader.grade(r.answer or "", item) for r, item in zip(results, held_out)) / len(held_out)
    best_single = max(sim.expected_accuracy(agent, held_out) for agent in sim.agents)
    oracle = sim.oracle_accuracy(held_out)
    assert recruited >= best_single + 0.10
    assert recruited >= oracle - 0.05
    explanation = results[0].node("answer").recruitment["explanation"][0]
    assert held_out.items[0].category in explanation


def test_aggregation_benchmark_uses_one_correct_and_two_wrong_traces() -> None:
    sim = simulated_pool(seed=2)
    pool = sim.pool()
    report = build_profiles(pool, sim.items(10), aggregation_items=12)
    assert report.aggregation_items == 12
    prompts = [r.prompt_text() for r in pool.agents[0].model.requests if "responses from several" in r.prompt_text()]
    assert len(prompts) == 12
    for prompt in prompts:
        assert prompt.count("The answer is") >= 3
    ranked = sorted(report.profiles.values(), key=lambda p: p.aggregation_score or 0)
    assert ranked[-1].aggregation_score >= ranked[0].aggregation_score


def test_dataset_from_items_hash_changes_with_content() -> None:
    a = Dataset.from_items([{"id": "1", "question": "q", "answer": "1"}])
    b = Dataset.from_items([{"id": "1", "question": "q", "answer": "2"}])
    assert a.sha256 != b.sha256


def test_keywords_in_the_papers_text_form_are_read_even_when_json_was_asked(loopback) -> None:
    from orchestra.models import OpenAICompatible
    from orchestra.testing import chat_handler

    server = loopback(chat_handler(lambda request: "Keywords: Organic Chemistry, lab safety"))
    model = OpenAICompatible(model="kw", base_url=server.url + "/v1")
    extractor = SkillExtractor()

    async def extract() -> list[str]:
        outcomes = []
        async for _, outcome in model.complete_each(extractor.requests("How do I neutralise an acid spill?")):
            outcomes.append(outcome)
        return extractor.combine(outcomes)

    assert asyncio.run(extract()) == ["organic chemistry", "lab safety"]
    assert server.requests[0].json()["response_format"]["type"] == "json_schema"


def test_profiling_reads_keywords_in_the_papers_text_form_from_the_text_a_run_reads() -> None:
    """A keyword model answering "Keywords: a, b" where JSON was asked: a run read its keywords, but every
    such sample counted as a failed call and stopped the profile (``--resume`` too). And the keywords of a
    multiple-choice item were extracted from its bare question, a run's from the question with its choices."""
    from helpers import kind_of

    from orchestra.models import ChatRequest

    asked: list[str] = []

    def keywords(request: ChatRequest) -> str:
        if kind_of(request) == "keywords":
            asked.append(request.messages[-1].content)
            return "Keywords: arithmetic, addition"
        return "The answer is (B)"

    pool = Pool(agents=[Agent(name="a", model=FunctionModel(lambda r: "The answer is (B)", name="m1")),
                        Agent(name="b", model=FunctionModel(lambda r: "The answer is (A)", name="m2"))],
                planner=FunctionModel(keywords, name="kw"))
    items = tuple(Item(id=f"q{i}", question=f"What is 2 + {i}?", answer="B", choices=("zero", f"{2 + i}"))
                  for i in range(2))
    report = build_profiles(pool, Dataset(items=items, path="val.jsonl", sha256="x"))
    assert report.item_keywords == {"q0": ["arithmetic", "addition"], "q1": ["arithmetic", "addition"]}
    assert report.profiles["a"].skills == {"arithmetic": 2, "addition": 2}
    questions = [prompt for prompt in asked if "What is 2 +" in prompt]  # (not the JSON repairs)
    assert len(questions) == 10 and all("(A) zero" in prompt and "(B) " in prompt for prompt in questions)


@pytest.mark.parametrize(("skills", "says"), [
    ({"arithmetic": 10 ** 30}, "skills.arithmetic: 1000000000000000000000000000000 is beyond ±4, the items it was measured on"),
    ({"arithmetic": -5}, "skills.arithmetic: -5 is beyond ±4"),
    ({" ": 1}, "skills: a skill has an empty name"),
])
def test_a_profile_whose_sums_no_items_could_give_is_refused(tmp_path: Path, skills: dict[str, int], says: str) -> None:
    """A hand-edited sum of -10**30 flattened the other agents' γ to 0.5, and an aggregator that was wrong won."""
    from orchestra.profile import Provenance, SkillProfile

    good = SkillProfile(agent="a", skills={"arithmetic": 4}, accuracy=0.5,
                        provenance=Provenance(dataset="d", dataset_sha256="0" * 64, items=4, model="m"))
    path = good.save(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "skills": skills}))
    with pytest.raises(ConfigError, match=re.escape(says)):
        SkillProfile.load(path)


@pytest.mark.parametrize(("edit", "says"), [
    ({"provenance": {"items": 10 ** 400}, "skill_counts": {"arithmetic": [10 ** 400, 10 ** 400]}},
     "provenance.items: Input should be less than or equal to 1000000000"),
    ({"skill_counts": {"arithmetic": [3, 50]}}, "skill_counts.arithmetic: 50 items, more than the 4 it was measured on"),
    ({"aggregation_items": 2, "aggregation_score": 0.5, "aggregation_skills": {"arithmetic": [1, 9]}},
     "aggregation_skills.arithmetic: 9 items, more than the 2 it was measured on"),
    ({"aggregation_skills": {"arithmetic": [1, 10 ** 400]}}, "aggregation_skills.arithmetic: 1000000000000"),
    ({"version": 0}, "version: profile version 0 is no version Orchestra writes (they start at 1)"),
    ({"version": -5}, "version: profile version -5 is no version Orchestra writes"),
])
def test_a_profile_whose_counts_no_measuring_could_give_is_refused(tmp_path: Path, edit: dict, says: str) -> None:
    """A count of 10**400 loaded and then failed as an OverflowError traceback in the router; counts over
    more items than the profile was measured on, and a version below 1, loaded without a word."""
    from orchestra.profile import Provenance, SkillProfile

    good = SkillProfile(agent="a", skills={"arithmetic": 4}, accuracy=0.5, skill_counts={"arithmetic": (3, 4)},
                        provenance=Provenance(dataset="d", dataset_sha256="0" * 64, items=4, model="m"))
    path = good.save(tmp_path)
    data = json.loads(path.read_text())
    provenance = {**data["provenance"], **edit.pop("provenance", {})}
    path.write_text(json.dumps({**data, **edit, "provenance": provenance}))
    with pytest.raises(ConfigError, match=re.escape(says)):
        SkillProfile.load(path)


def test_a_blank_category_is_none_and_a_category_is_trimmed() -> None:
    """A category of spaces was a report row of its own with a blank label, apart from the items without one."""
    assert [Item(id="1", question="q", answer="a", category=c).category for c in ("  ", "", " math ", None)] == [
        None, None, "math", None]
