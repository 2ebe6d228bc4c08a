"""What the model is given with a message (chatpipe/history.py), and the session API's pages."""

from __future__ import annotations

from typing import Any

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.history import Turn, alone, page, parse_turns, prompt
from chatpipe.schemas import ChatMessage, ChatRequest
from chatpipe.settings import Settings

MARK = "[stopped]"


def settings(**values: Any) -> Settings:
    return Settings(history_cancelled_mark=MARK, **values)


def turn(n: int, status: str = "completed", answer: str | None = None) -> Turn:
    return Turn.model_validate(
        {
            "message_id": f"m{n}",
            "message": f"q{n}",
            "answer": f"a{n}" if answer is None else answer,
            "status": status,
        }
    )


def request(message: str = "now", **values: Any) -> ChatRequest:
    return ChatRequest(message_id="m-now", session_id="s", message=message, **values)


def pairs(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


def test_earlier_turns_come_first_in_order_then_this_message() -> None:
    got = prompt([turn(1), turn(2)], request(), settings())
    assert pairs(got) == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
        ("user", "now"),
    ]


def test_a_stopped_answer_is_sent_as_far_as_it_got_and_marked_a_failed_one_is_not() -> None:
    turns = [turn(1, "cancelled", "half of it "), turn(2, "failed"), turn(3, "cancelled", "")]
    got = prompt(turns, request(), settings())
    assert pairs(got) == [
        ("user", "q1"),
        ("assistant", f"half of it {MARK}"),
        ("user", "q3"),
        ("assistant", MARK),  # stopped before its first token: the user's turn stays
        ("user", "now"),
    ]
    left_out = prompt(turns, request(), settings(history_include_cancelled=False))
    assert pairs(left_out) == [("user", "now")]


def test_the_oldest_whole_turns_are_dropped_to_fit_the_budget() -> None:
    turns = [turn(1, answer="x" * 10), turn(2, answer="y" * 10), turn(3, answer="z" * 10)]
    # each turn is 2 + 10 characters: a budget of 25 keeps the newest two
    got = prompt(turns, request(), settings(history_max_chars=25))
    assert [m.content for m in got] == ["q2", "y" * 10, "q3", "z" * 10, "now"]
    assert pairs(prompt(turns, request(), settings(history_max_chars=11))) == [("user", "now")]
    assert len(prompt(turns, request(), settings(history_max_turns=1))) == 3


def test_the_system_prompt_goes_first_and_history_off_sends_the_message_alone() -> None:
    got = prompt([turn(1)], request(), settings(llm_system_prompt="be brief"))
    assert pairs(got)[0] == ("system", "be brief")
    assert pairs(prompt([turn(1)], request(), settings(history_max_turns=0))) == [("user", "now")]


def test_a_requests_own_messages_are_used_as_given() -> None:
    given = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    req = ChatRequest(message_id="m-now", session_id="s", messages=given)
    assert prompt([turn(1)], req, settings(llm_system_prompt="ignored")) == given
    assert alone(req) == given
    assert req.message == "u"  # the last user entry is the turn's message


def test_the_message_itself_is_never_its_own_history() -> None:
    again = Turn(message_id="m-now", message="now", answer="old", status="cancelled")
    assert pairs(prompt([turn(1), again], request(), settings())) == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "now"),
    ]


def test_the_simulator_answers_from_the_whole_conversation_it_was_given() -> None:
    req = request("and why?")
    without = simulated_tokens(req, 8)
    assert simulated_tokens(req, 8, alone(req)) == without  # no history: as before
    assert simulated_tokens(req, 8, prompt([turn(1)], req, settings())) != without


def test_pages_are_the_newest_turns_before_an_id() -> None:
    turns = [turn(n) for n in range(1, 6)]
    newest, more = page(turns, 2, None)
    assert [t.message_id for t in newest] == ["m4", "m5"]
    assert more
    older, more = page(turns, 2, "m4")
    assert [t.message_id for t in older] == ["m2", "m3"]
    assert more
    oldest, more = page(turns, 2, "m2")
    assert [t.message_id for t in oldest] == ["m1"]
    assert not more
    assert page(turns, 2, "unknown") == ([], False)


def test_an_entry_that_is_not_a_turn_is_skipped() -> None:
    good = turn(1).model_dump_json()
    assert [t.message_id for t in parse_turns([b"{not json", good, b'{"x": 1}'])] == ["m1"]
