"""Skill matching, keyword extraction and the command line's error hints: details the other tests left open
(each found by a surviving one-line mutant)."""

from __future__ import annotations

import asyncio
import math

import pytest
from pydantic import ValidationError

from orchestra.errors import BadResponse
from orchestra.hints import advise_store, budget_hint, command, run_error, run_hint
from orchestra.matching import EmbeddingMatcher, LexicalMatcher, Match, MatcherSpec
from orchestra.models import ChatResult
from orchestra.models.metering import Meter, metering
from orchestra.prompts import RENDER_FAILED
from orchestra.result import RunResult
from orchestra.skills import KeywordConfig, SkillExtractor, skill_names
from orchestra.store import default_store_path
from orchestra.testing import LoopbackRequest, Reply

# --- the lexical matcher ----------------------------------------------------------------------


def test_a_keyword_shorter_than_every_ngram_size_still_matches_its_skill() -> None:
    """A text shorter than an n-gram still gives one (padded) gram of that size: with 4-grams only, the
    one-letter skill ``r`` is still found."""
    assert LexicalMatcher(sizes=(4,)).nearest("R", ["r", "python"]) == Match("R", "r", 1.0)


# --- matcher settings -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    MatcherSpec(min_similarity=0.6),
    MatcherSpec(type="embedding", model="mini", base_url="http://127.0.0.1:9/v1", api_key_env="EMBED_KEY",
                timeout=7, min_similarity=0.8),
])
def test_a_matcher_built_from_settings_has_them_and_describes_itself_by_them(spec: MatcherSpec) -> None:
    """``MatcherSpec.build`` uses every setting given, and the matcher's ``spec()`` (stored with a run so a
    resume matches the same way) gives the same settings back."""
    matcher = spec.build()
    assert matcher.min_similarity == spec.min_similarity
    assert matcher.spec() == spec
    if isinstance(matcher, EmbeddingMatcher):
        assert (matcher.api_key_env, matcher.timeout) == ("EMBED_KEY", 7)


@pytest.mark.parametrize("settings", [
    {"type": "embedding", "model": "mini"},  # no base_url
    {"type": "embedding", "base_url": "http://127.0.0.1:9/v1"},  # no model
    {"api_key_env": "EMBED_KEY"},  # an embedding setting on a lexical matcher
    {"min_similarity": 1.5},  # a similarity is at most 1
])
def test_incomplete_or_misplaced_matcher_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MatcherSpec(**settings)


# --- the embedding matcher --------------------------------------------------------------------


def embedding_server(loopback, axes: dict[str, list[float]], *, order=lambda rows: rows, extra: int = 0):
    """A loopback ``/v1/embeddings`` giving ``axes[text]``; returns its URL root and the inputs of each request."""
    asked: list[list[str]] = []

    def embeddings(request: LoopbackRequest) -> Reply:
        inputs = request.json()["input"]
        asked.append(inputs)
        rows = [{"index": i, "embedding": axes[t]} for i, t in enumerate(inputs)]
        rows += [{"index": len(inputs) + i, "embedding": [1.0, 0.0]} for i in range(extra)]
        return Reply(body={"data": order(rows)})

    return loopback(embeddings).url + "/v1", asked


def test_the_default_embedding_threshold_is_one_half(loopback) -> None:
    """Unset, ``min_similarity`` is 0.5: a cosine just under it maps to nothing, one at it is matched."""
    below = [0.49, math.sqrt(1 - 0.49 ** 2)]
    at = [1.0, math.sqrt(3.0)]  # cosine 1/2 (within rounding, from above) with the x axis
    url, _ = embedding_server(loopback, {"below": below, "at": at, "algebra": [1.0, 0.0]})
    matcher = EmbeddingMatcher(model="mini", base_url=url)
    assert matcher.min_similarity == 0.5
    assert asyncio.run(matcher.match(["below", "at"], ["algebra"])) == [Match("at", "algebra", 0.5)]


def test_equally_similar_embeddings_go_to_the_first_skill_in_the_vocabulary(loopback) -> None:
    axes = {"equations": [1.0, 0.0], "maths": [2.0, 0.0], "algebra": [3.0, 0.0], "geometry": [0.0, 1.0]}
    url, _ = embedding_server(loopback, axes)
    matcher = EmbeddingMatcher(model="mini", base_url=url)
    assert asyncio.run(matcher.match(["equations"], ["geometry", "maths", "algebra"])) == [
        Match("equations", "maths", 1.0)]


def test_embeddings_sent_out_of_order_are_put_back_in_order_by_their_index(loopback) -> None:
    axes = {"equations": [1.0, 0.0, 0.0], "algebra": [1.0, 0.1, 0.0], "geometry": [0.0, 0.0, 1.0]}
    url, _ = embedding_server(loopback, axes, order=lambda rows: rows[::-1])
    matcher = EmbeddingMatcher(model="mini", base_url=url)
    assert [m.skill for m in asyncio.run(matcher.match(["equations"], ["algebra", "geometry"]))] == ["algebra"]


def test_the_embedding_endpoints_tokens_are_charged_to_the_open_meter(loopback) -> None:
    """The prompt tokens an embeddings response bills count in the meter of the work that asked for them."""

    def embeddings(request: LoopbackRequest) -> Reply:
        inputs = request.json()["input"]
        return Reply(body={"data": [{"index": i, "embedding": [1.0, 0.0]} for i in range(len(inputs))],
                           "usage": {"prompt_tokens": 7, "total_tokens": 7}})

    matcher = EmbeddingMatcher(model="mini", base_url=loopback(embeddings).url + "/v1")

    async def matched() -> Meter:
        with metering() as meter:
            await matcher.match(["equations"], ["algebra"])
        return meter

    meter = asyncio.run(matched())
    assert (meter.requests, meter.prompt_tokens) == (1, 7)


def test_the_switch_that_forbids_real_model_requests_forbids_embeddings_too(loopback) -> None:
    """A pool of doubles with an embedding matcher sent a real /v1/embeddings request with the switch off."""
    from orchestra.errors import ModelRequestsForbidden
    from orchestra.testing import allow_model_requests

    asked: list[object] = []

    def embeddings(request: LoopbackRequest) -> Reply:
        asked.append(request)
        return Reply(body={"data": [{"index": 0, "embedding": [1.0, 0.0]}]})

    matcher = EmbeddingMatcher(model="mini", base_url=loopback(embeddings).url + "/v1")
    with allow_model_requests(False), pytest.raises(ModelRequestsForbidden, match="embeddings from http://127"):
        asyncio.run(matcher.match(["equations"], ["algebra"]))
    assert asked == []


def test_more_embeddings_than_texts_is_a_bad_response(loopback) -> None:
    url, _ = embedding_server(loopback, {"equations": [1.0, 0.0], "algebra": [1.0, 0.0]}, extra=1)
    matcher = EmbeddingMatcher(model="mini", base_url=url)
    with pytest.raises(BadResponse, match="returned 3 vectors for 2 inputs"):
        asyncio.run(matcher.match(["equations"], ["algebra"]))


def test_texts_wanted_by_recruitments_at_the_same_time_are_fetched_once(loopback) -> None:
    """Two matches running together ask for the same texts once: the second waits for the first's fetch."""
    url, asked = embedding_server(loopback, {"equations": [1.0, 0.0], "algebra": [1.0, 0.0], "geometry": [0.0, 1.0]})
    matcher = EmbeddingMatcher(model="mini", base_url=url)

    async def both() -> list[list[Match]]:
        return list(await asyncio.gather(*(matcher.match(["equations"], ["algebra", "geometry"]) for _ in range(2))))

    assert asyncio.run(both()) == [[Match("equations", "algebra", 1.0)]] * 2
    assert asked == [["equations", "algebra", "geometry"]]


# --- keyword extraction -----------------------------------------------------------------------


def test_the_keyword_defaults_are_the_papers() -> None:
    """Keywords of at most 20 characters, at most 5 per sample, answers of at most 64 tokens."""
    request = SkillExtractor().requests("What is 2 + 2?")[0]
    assert request.max_tokens == 64
    assert request.output["properties"]["keywords"]["maxItems"] == 5  # type: ignore[index]
    config = KeywordConfig()
    assert (config.max_length, config.max_keywords, config.max_tokens) == (20, 5, 64)
    assert SkillExtractor().parse(ChatResult(text="", parsed={"keywords": ["a" * 21, "b" * 20]})) == ["b" * 20]


def test_skill_names_keep_the_joiners_of_common_skill_names() -> None:
    """``c++``, ``q&a``, ``node.js``, ``e-commerce`` and ``o'reilly`` are plain words (the comment's promise)."""
    names = ["C++", "Q&A", "node.js", "e-commerce", "o'reilly", "c# basics", "ci/cd"]
    assert skill_names(names, 20) == ["c++", "q&a", "node.js", "e-commerce", "o'reilly", "c# basics", "ci/cd"]


def test_a_singular_keyword_line_is_read() -> None:
    """The text form's label may be singular: ``Keyword: optics``."""
    assert SkillExtractor().parse(ChatResult(text="The question is about light.\nKeyword: optics")) == ["optics"]


def test_a_list_mixing_strings_and_other_values_is_not_the_keyword_list() -> None:
    """Under another key, only a list of strings alone is the keyword list."""
    parsed = {"ids": [1, "note"], "skills": ["algebra", "geometry"]}
    assert SkillExtractor().parse(ChatResult(text="", parsed=parsed)) == ["algebra", "geometry"]


def test_combined_keywords_are_the_most_frequent_first() -> None:
    """A keyword more samples name comes first, even when another was seen before it."""
    samples = [ChatResult(text="", parsed={"keywords": ["optics", "algebra"]}),
               ChatResult(text="", parsed={"keywords": ["optics", "algebra"]}),
               ChatResult(text="", parsed={"keywords": ["algebra"]})]
    assert SkillExtractor().combine(samples) == ["algebra", "optics"]


# --- the command line's hints -----------------------------------------------------------------


def test_the_default_store_named_with_store_adds_no_store_flag_to_the_advice(tmp_path) -> None:
    """``--store`` naming the default store is no other store: the commands advised need no ``--store``."""
    try:
        advise_store(default_store_path())
        assert command("resume", "r1", "--force") == "orchestra resume r1 --force"
        advise_store(tmp_path / "other.db")
        assert command("resume", "r1") == f"orchestra resume r1 --store {tmp_path / 'other.db'}"
    finally:
        advise_store(None)
    assert command("runs") == "orchestra runs"


def test_a_run_whose_template_failed_is_resumed_with_reload_only_when_kept_and_the_users_fault() -> None:
    error = f"{RENDER_FAILED}step 'a': 'x' is undefined"
    fixable = RunResult(run_id="r1", task="t", status="failed", error=error, user_error=True)
    assert run_hint(fixable) == "fix the workflow, then `orchestra resume r1 --reload` (its answers are kept)"
    assert run_hint(fixable, stored=False) is None  # nothing to resume
    assert run_hint(RunResult(run_id="r1", task="t", status="failed", error=error)) is None  # not the file's fault


def test_a_budget_stop_of_a_run_not_kept_offers_no_resume() -> None:
    stopped = RunResult(run_id="r1", task="t", status="budget_exceeded", error="budget max_calls=2 reached (2 calls made)")
    assert run_error(stopped, stored=False) == (
        "run r1 budget_exceeded: budget max_calls=2 reached (2 calls made); raise it with --max-calls (or "
        "budget.max_calls in the workflow) and run it again (nothing was kept: --no-store)")


def test_an_evaluations_budget_stop_names_the_flag_and_the_evaluation() -> None:
    message = "the data set's budget max_cost_usd=1 reached ($1.00 spent) (3 of 5 items unfinished)"
    assert budget_hint(message, None, evaluation=True) == (
        "raise it with --max-cost and run the evaluation again with --resume (finished items are kept)")
    assert budget_hint(message, None, stored=False, evaluation=True) == (
        "raise it with --max-cost and run the evaluation again")
