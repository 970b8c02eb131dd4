"""The rule that rewrites a follow-up to stand alone with the extractive default, the history
bounds every rewrite reads within, and how chat messages become a question and its history."""

from __future__ import annotations

import pytest

from impl.errors import InvalidInput
from impl.rag.chat import Message, split_messages
from impl.rag.rewriting import QuestionRewriting, RuleBasedRewriter, resolve
from impl.rag.types import Exchange
from impl.settings import Settings

OPEN = "How do I open a database connection?"


@pytest.mark.parametrize(
    ("question", "previous", "standalone"),
    [
        # A pronoun takes the previous subject, the noun phrase after its last article.
        ("and how do I close it?", OPEN, "How do I close the database connection?"),
        (
            "what are its limits?",
            "What is the write-ahead log?",
            "What are the write-ahead log's limits?",
        ),
        (
            "Can they be shared between threads?",
            "How do I cache the prepared statements?",
            "Can the prepared statements be shared between threads?",
        ),
        # A demonstrative refers back only when it stands alone.
        ("How do I undo that?", "How do I enable the WAL mode?", "How do I undo the WAL mode?"),
        ("Is this setting safe?", OPEN, "Is this setting safe?"),
        # "what about X?" asks the previous question of X.
        ("what about a file?", OPEN, "How do I open a file?"),
        ("And what about sockets?", OPEN, "How do I open sockets?"),
        ("what about checkpoints?", "What is WAL mode?", "What is checkpoints?"),
        # Ellipsis of one key term gets the subject; a question of its own stays as it is.
        ("and in Python?", OPEN, "in Python? (database connection)"),
        ("How is bread baked?", OPEN, "How is bread baked?"),
        # Without a subject (or a turn) before, nothing changes.
        ("how do I close it?", "Why?", "how do I close it?"),
        ("how  do I close   it?", None, "how do I close it?"),
    ],
)
def test_the_rule_resolves_references_to_the_previous_question(
    question: str, previous: str | None, standalone: str
) -> None:
    assert resolve(question, previous) == standalone


def test_the_rule_follows_a_chain_of_follow_ups() -> None:
    history = [Exchange(OPEN, "Call connect()."), Exchange("what about a file?", "Call open().")]
    assert RuleBasedRewriter().standalone("and how do I close it?", history) == (
        "How do I close the file?"
    )


def test_the_history_is_bounded_by_turns_and_by_tokens() -> None:
    history = [Exchange(f"question {n} about databases", "answer " * 40) for n in range(10)]
    by_turns = QuestionRewriting(Settings(conversation_history_turns=3))
    assert by_turns.bounded(history) == history[-3:]
    one_turn = by_turns.count_tokens(history[0].question) + by_turns.count_tokens(history[0].answer)
    by_tokens = QuestionRewriting(
        Settings(conversation_history_turns=10, conversation_history_tokens=2 * one_turn + 1)
    )
    assert by_tokens.bounded(history) == history[-2:]
    # The rule reads only what the bounds keep: a turn dropped lends no subject.
    old = [Exchange(OPEN, "x"), Exchange("and in Python?", "y")]
    follow_up = "and how do I close it?"
    kept = QuestionRewriting(Settings(conversation_history_turns=2))
    assert kept.standalone(follow_up, old) == "How do I close Python database connection?"
    dropped = QuestionRewriting(Settings(conversation_history_turns=1))
    assert dropped.standalone(follow_up, old) == "How do I close Python?"


def test_chat_messages_are_the_last_users_question_and_the_exchanges_before_it() -> None:
    messages = [
        Message("system", "Be brief."),
        Message("user", OPEN),
        Message("assistant", "Call connect()."),
        Message("developer", "Cite."),
        Message("user", "and the file?"),
        Message("user", "and how do I close it?"),
    ]
    question, history = split_messages(messages)
    assert question == "and how do I close it?"
    assert history == [Exchange(OPEN, "Call connect()."), Exchange("and the file?", "")]


@pytest.mark.parametrize(
    "last", [Message("assistant", "Hello."), Message("user", None), Message("user", "  ")]
)
def test_chat_messages_must_end_with_a_users_question(last: Message) -> None:
    with pytest.raises(InvalidInput) as caught:
        split_messages([Message("user", OPEN), last])
    assert caught.value.errors[0].location == "body/messages/1"
