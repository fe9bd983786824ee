"""Unit tests of orchestra.openai_wire's request reading and chunk writing (no server)."""

from __future__ import annotations

import json

import pytest

from orchestra.openai_wire import CONTEXT_CHARS, ChunkWriter, WireError, parse_completion, pieces, usage
from orchestra.result import RunResult

ASK = [{"role": "user", "content": "What is 2 + 2?"}]


def refused(body: dict) -> WireError:
    with pytest.raises(WireError) as error:
        parse_completion(body)
    return error.value


def test_an_empty_model_id_is_a_400_naming_model_not_a_404_later() -> None:
    error = refused({"model": "", "messages": ASK})
    assert (error.status, error.param) == (400, "model")


def test_blank_earlier_turns_are_left_out_of_the_context() -> None:
    completion = parse_completion({"model": "orchestra", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "   "},
        {"role": "user", "content": None}, *ASK]})
    assert completion.context == "System: Be brief."


def test_a_long_conversation_keeps_its_most_recent_turns_as_context() -> None:
    old, recent = "o" * CONTEXT_CHARS, "the latest turn"
    completion = parse_completion({"model": "orchestra", "messages": [
        {"role": "user", "content": old}, {"role": "assistant", "content": recent}, *ASK]})
    assert len(completion.context) == CONTEXT_CHARS and completion.context.endswith(f"Assistant: {recent}")


def test_a_long_conversation_keeps_its_system_message_and_cuts_old_turns_at_their_start() -> None:
    """Past 16,000 characters the system message stayed behind ("Answer in French." lost) and the
    context began mid-message without its speaker."""
    completion = parse_completion({"model": "orchestra", "messages": [
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "u" * 20_000},
        {"role": "assistant", "content": "recent"}, {"role": "developer", "content": "Be brief."}, *ASK]})
    context = completion.context
    assert len(context) == CONTEXT_CHARS
    assert context.startswith("System: Answer in French.\nSystem: Be brief.\nUser: …uuu")
    assert context.endswith("uuu\nAssistant: recent")


@pytest.mark.parametrize("value", [0, 0.0, 2, 1.5])
def test_temperature_takes_both_ends_of_its_range(value: float) -> None:
    assert parse_completion({"model": "orchestra", "messages": ASK, "temperature": value}).temperature == value


@pytest.mark.parametrize("value", [-0.1, 2.01, True, "1"])
def test_temperature_out_of_range_or_not_a_number_is_refused(value: object) -> None:
    assert refused({"model": "orchestra", "messages": ASK, "temperature": value}).param == "temperature"


def test_max_tokens_must_be_positive() -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        assert refused({"model": "orchestra", "messages": ASK, name: 0}).param == name
        assert parse_completion({"model": "orchestra", "messages": ASK, name: 1}).max_tokens == 1


@pytest.mark.parametrize(("name", "value"), [("k", True), ("seed", False), ("plan", 1), ("mode", 3)])
def test_a_setting_of_the_wrong_type_is_refused_booleans_are_not_integers(name: str, value: object) -> None:
    assert refused({"model": "orchestra", "messages": ASK, name: value}).param == name


def test_settings_of_the_right_type_are_kept() -> None:
    completion = parse_completion({"model": "orchestra", "messages": ASK, "k": 3, "plan": False, "seed": 0})
    assert completion.settings == {"k": 3, "plan": False, "seed": 0}


def test_usage_totals_prompt_and_completion_tokens() -> None:
    result = RunResult.model_validate({"run_id": "r", "task": "t", "status": "done",
                                       "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
    assert usage(result) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_chunks_carry_usage_null_only_when_usage_was_asked_for() -> None:
    def body(chunk: bytes) -> dict:
        return json.loads(chunk.removeprefix(b"data: "))

    assert "usage" not in body(ChunkWriter("r", "orchestra", 0).role())
    assert body(ChunkWriter("r", "orchestra", 0, include_usage=True).role())["usage"] is None


@pytest.mark.parametrize("text", ["a", "one two three four five", "one two three four x", "  lead  and trail  ", ""])
def test_pieces_join_back_to_the_text(text: str) -> None:
    assert "".join(pieces(text)) == text


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 5}])
def test_a_text_part_without_its_text_says_so(part: dict) -> None:
    """It said "is 'text': only text content is supported" of a text part."""
    error = refused({"model": "orchestra", "messages": [{"role": "user", "content": [part]}]})
    assert (error.status, error.param) == (400, "messages[0].content[0].text")
    assert str(error) == "messages[0].content[0] is a text part without its text (a string under 'text')"


@pytest.mark.parametrize("extra, param, says", [
    # (each was accepted and ignored: a full, paid run answered in text)
    ({"tool_choice": "required"}, "tool_choice", "asks for a tool call, but tool calling is not supported"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "asks for a tool call"),
    ({"function_call": {"name": "f"}}, "function_call", "asks for a tool call"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is true"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs, which is not supported"),
    ({"top_logprobs": 0}, "top_logprobs", "needs logprobs, which is not supported"),
    ({"audio": {"voice": "x", "format": "wav"}}, "audio", "audio output is not supported"),
    ({"progress": True}, "progress", "it needs 'stream' true"),
    # (each was "unknown parameter", though the Chat Completions API has it)
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "'prediction' (predicted outputs) is not "
                                                                        "supported"),
    ({"web_search_options": {}}, "web_search_options", "'web_search_options' is not supported"),
])
def test_parameters_asking_for_what_an_orchestra_cannot_give_are_400s(extra: dict, param: str, says: str) -> None:
    error = refused({"model": "orchestra", "messages": ASK, **extra})
    assert (error.status, error.param) == (400, param) and says in error.message


def test_the_defaults_of_those_parameters_are_accepted() -> None:
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"function_call": "auto"}, {"audio": None},
                  {"top_logprobs": None}, {"stream": True, "stream_options": {"include_usage": True}},
                  {"stream": True, "progress": True}, {"progress": False}, {"prediction": None},
                  {"web_search_options": None}):
        parse_completion({"model": "orchestra", "messages": ASK, **extra})
