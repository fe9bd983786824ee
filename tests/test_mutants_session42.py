"""Where session 42's mutation round left a one-line mutant alive: the wire's stop sequences,
parameter checks and streamed pieces; a served orchestra's key, agent models, token checks and advice
(over real HTTP on 127.0.0.1); budgets' boundaries, a resumed run's counts and runs' admission; a data
set's rows and what its errors say. Each test fails with its mutant in place and passes on the code as
it is (one found a bug: copying a BudgetExceeded raised TypeError)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from helpers import scripted_pool

from orchestra.budget import Budget, BudgetTracker, RunAdmission, legacy_budget
from orchestra.datasets import Dataset, load_dataset
from orchestra.errors import BudgetExceeded, DatasetError
from orchestra.models import ChatRequest, Usage
from orchestra.models.pricing import FREE, Price
from orchestra.money import dollars
from orchestra.openai_wire import Completion, WireError, parse_completion, pieces, stopped
from orchestra.result import RunResult
from orchestra.serve import ServedModel, Server, _failure, app
from orchestra.settings import Settings

ASK = [{"role": "user", "content": "What is 2 + 2?"}]


def _refused(body: dict[str, object]) -> WireError:
    """The 400 ``body`` is refused with."""
    with pytest.raises(WireError) as error:
        parse_completion(body)
    return error.value


# --- openai_wire.py: stop sequences and the wire's parameter checks ----------------------------


def test_four_stop_sequences_are_taken() -> None:
    """OpenAI allows up to 4 stop sequences: 4 are taken, 5 refused."""
    stops = ["a", "b", "c", "d"]
    assert parse_completion({"model": "orchestra", "messages": ASK, "stop": stops}).stop == tuple(stops)
    assert _refused({"model": "orchestra", "messages": ASK, "stop": [*stops, "e"]}).param == "stop"


def test_an_answer_that_begins_with_a_stop_sequence_is_empty() -> None:
    """A stop sequence at the very start of the answer cuts all of it (it was taken as not found)."""
    assert stopped("END of it", ["END"]) == ""
    assert stopped("no stop here", ["END"]) is None


def test_pieces_are_four_words_each_whatever_the_text_begins_and_ends_with() -> None:
    """A text streams four words a chunk; a leading space is no word's end (the text's last character
    was read as the one before it)."""
    assert list(pieces(" a b c d e f")) == [" a b c d", " e f"]
    assert list(pieces("one two three four five six seven eight nine")) == [
        "one two three four", " five six seven eight", " nine"]


# --- datasets.py: a data set's rows and what its errors say ------------------------------------

ROW = '{"id": "1", "question": "q", "answer": "a"}'


def _load_error(tmp_path: Path, raw: bytes) -> str:
    """The message loading a data set of ``raw`` bytes fails with."""
    path = tmp_path / "val.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DatasetError) as error:
        load_dataset(path)
    return str(error.value)


def test_a_bad_row_in_a_crlf_file_gets_no_cr_alone_hint(tmp_path: Path) -> None:
    """A file with CR LF endings has one CR at each line's end: a bad row there is not read as a file
    whose lines end at CR alone."""
    message = _load_error(tmp_path, f"{ROW}\r\n{{\"id\": \"2\",\r\n".encode())
    assert ":2: not valid JSON" in message and "CR alone" not in message


def test_a_json_array_on_a_later_line_gets_no_json_array_hint(tmp_path: Path) -> None:
    """An array on line 2 of a file whose first line was an object is a bad row of a JSON Lines file, not a
    data set written as one JSON array."""
    message = _load_error(tmp_path, f'{ROW}\n[{{"id": "2"}}]\n'.encode())
    assert message.endswith(":2: each line must be a JSON object")


def test_a_json_array_indented_on_its_first_line_gets_the_json_array_hint(tmp_path: Path) -> None:
    """A data set written as a JSON array, its ``[`` after a space, is told to be JSON Lines (not taken for a
    CSV or plain text file)."""
    message = _load_error(tmp_path, f" [\n  {ROW}\n]\n".encode())
    assert "this is a JSON array" in message and "convert it" not in message


def test_a_column_only_somewhat_like_a_field_name_is_kept_as_an_extra_column(tmp_path: Path) -> None:
    """Only a key nearly a missing field's name is taken for a misspelling: ``categ`` (0.77 alike to
    ``category``) is a column of its own, kept."""
    path = tmp_path / "val.jsonl"
    path.write_text('{"id": "1", "question": "q", "answer": "a", "categ": "x"}\n')
    item = load_dataset(path).items[0]
    assert item.category is None and item.model_extra == {"categ": "x"}
    path.write_text('{"id": "1", "question": "q", "answer": "a", "categroy": "x"}\n')
    with pytest.raises(DatasetError, match="did you mean 'category'"):
        load_dataset(path)


# --- serve.py: a served orchestra over real HTTP, its request checks and advice -----------------

@pytest.fixture
def served() -> Iterator[str]:
    """A served pool of two scripted agents (key ``sesame``) on uvicorn, on its own thread; its base URL."""
    pool, _ = scripted_pool(2)
    server = uvicorn.Server(uvicorn.Config(app(pool, store=False, api_key="sesame"), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        thread.join(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


def _post(url: str, body: dict[str, Any], authorization: str = "Bearer sesame") -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the JSON answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "content-type": "application/json", "authorization": authorization})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_bearer_token_after_more_than_one_space_is_read(served: str) -> None:
    """``Authorization: Bearer  KEY`` (two spaces) carries the key: the blank before it is no part of it."""
    ask = {"model": "agent0", "messages": ASK}
    assert _post(f"{served}/v1/chat/completions", ask, "Bearer  sesame")[0] == 200
    assert _post(f"{served}/v1/chat/completions", ask, "Bearer  wrong")[0] == 401


def _server() -> Server:
    """A server of two scripted agents, with no store."""
    pool, _ = scripted_pool(2)
    return app(pool, store=False).state.server


def test_a_request_that_needs_exactly_its_runs_token_limit_fits() -> None:
    """Messages of about 10 tokens and ``max_tokens`` 90 fit a run's limit of 100 tokens."""
    asked = Completion(model="orchestra", task="x" * 40, max_tokens=90)  # (41 characters with the newline: 10)
    _server()._check_fits(asked, 100)
    with pytest.raises(WireError):
        _server()._check_fits(asked, 99)


def test_a_max_tokens_of_exactly_the_limit_blames_the_messages() -> None:
    """``max_tokens`` equal to the limit fits it alone: what is over is the messages, named as ``param``."""
    asked = Completion(model="orchestra", task="x" * 40, max_tokens=100)
    with pytest.raises(WireError) as error:
        _server()._check_fits(asked, 100)
    assert error.value.param == "messages"
    with pytest.raises(WireError) as error:
        _server()._check_fits(Completion(model="orchestra", task="x" * 40, max_tokens=101), 100)
    assert error.value.param == "max_tokens"


def test_a_run_the_servers_budget_stopped_is_told_to_resume_with_no_limit_raised() -> None:
    """A resume is not under the server's budget: a run that budget stopped is not told to raise its own
    ``--max-tokens``, which stopped nothing."""
    stopped_run = RunResult(run_id="r1", task="t", status="budget_exceeded",
                            error="the server's budget max_tokens=1000 is spent (1000 tokens used)")
    served = ServedModel("orchestra", "orchestra", Settings())
    failure = _failure(stopped_run, True, served, Completion(model="orchestra", task="t"))
    assert failure is not None and failure.status == 429
    assert "--max-tokens" not in failure.message and "finishes it" in failure.message


# --- budget.py: limits, their boundaries, and what a resumed run's budget counts ----------------

#: a budget of tokens alone
TOKENS = Budget(max_calls=None, max_cost_usd=None, max_tokens=10_000)


def _worst(request: ChatRequest, price: Price = FREE, **options: Any) -> tuple[int, float]:
    """What a call of ``request`` is reserved at under a budget with room for it."""
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=1_000_000, max_cost_usd=1_000.0), "probe")
    worst = tracker.admit(request, price, **options)
    return worst.tokens, worst.cost_usd


def test_a_cost_limit_at_its_default_value_is_chosen_only_when_answers_are_capped_for_it() -> None:
    """``cost_limit_set``: a cost limit of another value than the default's is one someone chose,
    whatever ``cap_answers`` says; at the default's value only capping answers for it says so."""
    assert Budget(max_cost_usd=2.0, cap_answers=False).cost_limit_set
    assert Budget(max_cost_usd=1.0, cap_answers=True).cost_limit_set
    assert not Budget(max_cost_usd=1.0, cap_answers=False).cost_limit_set
    assert not Budget().cost_limit_set


def test_a_budget_recorded_before_cap_answers_caps_them_only_under_a_limit_other_than_the_default() -> None:
    """A legacy budget that records the default token or cost limit did not cap answers then, and its
    resume does not either; another value, or one set, does."""
    assert legacy_budget({"max_tokens": 1_000_000, "max_cost_usd": 1.0})["cap_answers"] is False
    assert legacy_budget({"max_tokens": None})["cap_answers"] is False
    assert legacy_budget({"max_tokens": 5_000})["cap_answers"] is True
    assert legacy_budget({"cap_answers": False, "max_tokens": 5})["cap_answers"] is False


def test_no_call_made_yet_reads_zero_calls() -> None:
    """A call refused while the only one in flight holds the last of ``max_calls`` says ``0 calls made``."""
    tracker = BudgetTracker(Budget(max_calls=1, max_tokens=None, max_cost_usd=None), "r")
    tracker.admit(ChatRequest.user("hi"), FREE)
    with pytest.raises(BudgetExceeded) as refused:
        tracker.admit(ChatRequest.user("hi"), FREE)
    assert "(0 calls made, 1 in flight)" in str(refused.value) and refused.value.held


def test_a_requests_own_max_tokens_comes_before_its_models_answer_limit() -> None:
    """A request that sets ``max_tokens`` is reserved at it, not at its model's default answer limit."""
    request = ChatRequest.user("hi", max_tokens=10)
    assert _worst(request, answer_limit=500) == _worst(request)
    assert _worst(ChatRequest.user("hi"), answer_limit=500)[0] == _worst(request)[0] + 490


def test_a_call_of_exactly_the_cost_limit_waits_for_the_one_in_flight_and_is_not_hopeless() -> None:
    """As for tokens: a call whose worst case costs the whole cost limit waits, and is not hopeless."""
    request, price = ChatRequest.user("hi", max_tokens=100), Price(input=1_000.0, output=1_000.0)
    _, cost = _worst(request, price)
    tracker = BudgetTracker(Budget(max_calls=None, max_tokens=None, max_cost_usd=dollars(cost)), "r")
    tracker.admit(request, price)
    with pytest.raises(BudgetExceeded) as refused:
        tracker.admit(request, price)
    assert refused.value.held and not refused.value.hopeless


def test_the_first_refusal_that_stopped_a_run_is_the_one_kept() -> None:
    """``stop`` makes a held refusal the one that stops a run only if none stopped it already."""
    tracker = BudgetTracker(Budget(max_calls=1, max_tokens=None, max_cost_usd=None), "r")
    tracker.settle(tracker.admit(ChatRequest.user("hi"), FREE), Usage(requests=1))
    with pytest.raises(BudgetExceeded) as first:
        tracker.admit(ChatRequest.user("hi"), FREE)
    later = BudgetExceeded(limit="max_tokens", value=5, spent="5 tokens used", run_id="r", held=True)
    tracker.stop(later)
    assert tracker.exceeded is first.value and later.held is False


#: a run's own budget that lifts every limit (its calls are still reserved in the shared budget above)
OPEN = Budget(max_calls=None, max_cost_usd=None, max_tokens=None)


def _shared_tokens(limit: int) -> tuple[BudgetTracker, RunAdmission]:
    """A data set's budget of ``limit`` tokens alone, and its runs' admission."""
    shared = BudgetTracker(Budget(max_calls=None, max_cost_usd=None, max_tokens=limit), None)
    return shared, RunAdmission(shared)


def test_before_any_run_ended_the_last_call_needs_the_largest_worst_case_left() -> None:
    """No run has ended on its own, one was cut: the next needs room for the largest worst case any call
    reserved (633 tokens), not only the refused call's (483), read as what a call holds beyond its spending."""
    shared, admission = _shared_tokens(1000)
    run = BudgetTracker(OPEN, "r1", parent=shared)
    run.settle(run.admit(ChatRequest.user("hi", max_tokens=600), FREE),
               Usage(prompt_tokens=90, completion_tokens=500, requests=1))
    with pytest.raises(BudgetExceeded):
        run.admit(ChatRequest.user("hi", max_tokens=450), FREE)  # 590 spent: no room for 483 more
    assert (shared.largest.tokens, run.wanted.tokens) == (633, 483)
    admission.ended(run, on_its_own=False, cut=True)
    refused = admission.refusal(0)
    assert refused is not None and "a call may need 633 tokens at worst" in str(refused)


def test_a_run_in_flight_that_committed_more_than_its_kind_takes_is_counted_at_what_it_committed() -> None:
    """A run in flight is expected to spend at least what it has committed: one that spent 850 tokens,
    where a run of its kind took 100, leaves no room for another run under a limit of 1,000."""
    shared, admission = _shared_tokens(1000)
    first = BudgetTracker(OPEN, "r1", parent=shared)
    first.settle(first.admit(ChatRequest.user("hi", max_tokens=50), FREE),
                 Usage(prompt_tokens=50, completion_tokens=50, requests=1))
    admission.ended(first, on_its_own=True)
    assert admission.refusal(1) is None  # (one run of 100 tokens in flight, nothing more committed)
    second = BudgetTracker(OPEN, "r2", parent=shared)
    second.settle(second.admit(ChatRequest.user("hi", max_tokens=50), FREE),
                  Usage(prompt_tokens=400, completion_tokens=450, requests=1))
    refused = admission.refusal(1)
    assert refused is not None and refused.limit == "max_tokens" and "950 tokens so far" in str(refused)


# --- a second round: more of the wire's checks, a data set's hash, budgets above a run ----------


def test_a_blank_task_is_refused_as_the_wire_reads_it() -> None:
    """A last user message of blanks alone is no task: a 400 naming its content."""
    error = _refused({"model": "orchestra", "messages": [{"role": "user", "content": "   "}]})
    assert (error.status, error.param) == (400, "messages[0].content")


def test_n_of_true_is_no_one() -> None:
    """``n`` is an integer: ``true`` (Python's bool is an int equal to 1) is refused, 1 taken."""
    assert _refused({"model": "orchestra", "messages": ASK, "n": True}).param == "n"
    parse_completion({"model": "orchestra", "messages": ASK, "n": 1})


def test_the_text_modality_alone_is_taken() -> None:
    """``modalities: ["text"]`` is what an orchestra answers in; ``["text", "audio"]`` is refused."""
    parse_completion({"model": "orchestra", "messages": ASK, "modalities": ["text"]})
    assert _refused({"model": "orchestra", "messages": ASK, "modalities": ["text", "audio"]}).param == "modalities"


def test_a_null_max_completion_tokens_leaves_max_tokens_in_force() -> None:
    """``max_completion_tokens: null`` beside ``max_tokens: 5`` is no limit given: ``max_tokens`` holds."""
    completion = parse_completion({"model": "orchestra", "messages": ASK, "max_completion_tokens": None,
                                   "max_tokens": 5})
    assert (completion.max_tokens, completion.max_tokens_name) == (5, "max_tokens")


def test_a_json_schemas_empty_name_is_no_title() -> None:
    """A json_schema whose ``name`` is empty gives the schema no (empty) title."""
    completion = parse_completion({"model": "orchestra", "messages": ASK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "", "schema": {"type": "object"}}}})
    assert completion.output == {"type": "object"}


def test_a_data_set_built_in_code_hashes_alike_whatever_the_order_of_its_extra_fields() -> None:
    """Two data sets of the same items, their extra columns given in another order, are one data set."""
    one = Dataset.from_items([{"id": "1", "question": "q", "answer": "a", "b": 1, "a": 2}])
    other = Dataset.from_items([{"id": "1", "question": "q", "answer": "a", "a": 2, "b": 1}])
    assert one.sha256 == other.sha256


def test_a_run_under_a_shared_budget_that_caps_answers_caps_them_too() -> None:
    """A run's budget that caps nothing, under a shared budget of a token limit someone set, bounds its
    answers by what they were reserved for (the shared limit would be overshot otherwise)."""
    shared = BudgetTracker(Budget(max_tokens=10_000), None)
    assert BudgetTracker(Budget(), "r", parent=shared).bounds_answers
    assert not BudgetTracker(Budget(), "r", parent=BudgetTracker(Budget(), None)).bounds_answers


def test_orchestras_errors_copy_and_pickle_as_made() -> None:
    """Errors whose constructors take keywords or more than the message raised TypeError in
    ``copy.copy`` and ``pickle.loads`` (as Ray unpickles an actor's error)."""
    import copy
    import pickle

    from orchestra.errors import ProfilingIncomplete, StoreUnusable

    spent = BudgetExceeded(limit="max_calls", value=3, spent="3 calls made", run_id="r", held=True)
    spent.resumable = False
    for error in (spent, ProfilingIncomplete("2 calls failed", ValueError("boom")), StoreUnusable("/x", "damaged")):
        for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
            assert type(twin) is type(error) and str(twin) == str(error)
            assert twin.__dict__.keys() == error.__dict__.keys()
            assert all(str(getattr(twin, name)) == str(value) for name, value in error.__dict__.items())


def test_a_closed_budgets_refusal_of_a_repair_is_a_copy_of_its_reason() -> None:
    """A closed budget refuses a call's repair with a copy of its reason (the call writes its usage on
    its error), a new call with the reason itself (the copy raised TypeError: the error's constructor
    takes keywords only, and ``copy`` made it anew from its message)."""
    tracker = BudgetTracker(TOKENS, "r")
    reason = BudgetExceeded(limit="max_tokens", value=5, spent="5 tokens used", run_id=None)
    tracker.close(reason)
    with pytest.raises(BudgetExceeded) as repair:
        tracker.admit(ChatRequest.user("hi"), FREE, within=True)
    assert repair.value is not reason and str(repair.value) == str(reason)
    with pytest.raises(BudgetExceeded) as call:
        tracker.admit(ChatRequest.user("hi"), FREE)
    assert call.value is reason
