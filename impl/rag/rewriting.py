"""Follow-up questions rewritten to stand alone, so that retrieval and the answer provider see
the whole question ("and how do I close it?" -> "how do I close the database connection?").

The history a rewrite reads is bounded: the last ``conversation_history_turns`` exchanges, and
of those only as many, newest first, as fit in ``conversation_history_tokens`` tokens of
questions and answers (counted with the embedding model's tokenizer).

- With the ``openai`` answer provider the same chat model rewrites the question from the
  history (one short call; no call when there is no history).
- Otherwise (``extractive``, and ``llamacpp``, whose small local model rewrites poorly) a rule
  does, from the previous questions alone (``RuleBasedRewriter``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

from langchain_core.prompts import ChatPromptTemplate
from pydantic import SecretStr

from impl.errors import UpstreamError
from impl.rag.embeddings import count_tokens, load_tokenizer
from impl.rag.terms import STOP_WORDS
from impl.rag.types import Exchange
from impl.settings import Settings

MAX_QUESTION_CHARS = 2000  # the contract's bound on a question
_REWRITE_TOKENS = 128


class Rewriter(Protocol):
    def standalone(self, question: str, history: Sequence[Exchange]) -> str:
        """``question`` rewritten to be understood without ``history`` (oldest first)."""


# -- the rule ---------------------------------------------------------------------------------

_WORD = re.compile(r"[\w'.-]*\w|\S")
_LEAD_INS = frozenset("and so also but then ok okay well".split())  # noqa: SIM905
_ARTICLES = frozenset("a an the my your our".split())  # noqa: SIM905
_COPULAS = frozenset("is are was were".split())  # noqa: SIM905
# Where a noun phrase after an article ends.
_PHRASE_ENDS = frozenset(
    """in on at for with to from by of when where if and or so that which who while after
    before into onto over under without via using""".split()  # noqa: SIM905
)
_PRONOUNS = frozenset("it they them".split())  # noqa: SIM905
_POSSESSIVES = frozenset("its their".split())  # noqa: SIM905
# Demonstratives refer back only when they stand alone ("undo that?"), not before a noun.
_DEMONSTRATIVES = frozenset("this that these those".split())  # noqa: SIM905
_QUESTION_WORDS = frozenset("what how why when where which who whom whose".split())  # noqa: SIM905
_ABOUT = re.compile(r"^(?:what|how)\s+about\s+(.+?)\s*\??\s*$", re.IGNORECASE)
_MIN_KEY_TERMS = 2


def _is_word(token: str) -> bool:
    return token[0].isalnum() or token[0] == "_"


def _key_terms(tokens: Sequence[str]) -> list[str]:
    return [
        t
        for t in tokens
        if _is_word(t) and t.lower() not in STOP_WORDS and t.lower() not in _QUESTION_WORDS
    ]


def _subject(question: str) -> tuple[str, str] | None:
    """The subject of a standalone question and the text it is written as there: the noun
    phrase after its last article (without the article), else what follows its copula
    ("what is WAL mode"), else its key terms (written as nothing: they are no phrase of it).
    None when it has none."""
    tokens = _WORD.findall(question)
    lowered = [t.lower() for t in tokens]
    for markers in (_ARTICLES, _COPULAS):
        starts = [i for i, t in enumerate(lowered) if t in markers]
        if not starts:
            continue
        phrase: list[str] = []
        for token in tokens[starts[-1] + 1 :]:
            if not _is_word(token) or token.lower() in _PHRASE_ENDS:
                break
            phrase.append(token)
        if phrase and _key_terms(phrase):
            written = " ".join(tokens[starts[-1] : starts[-1] + 1 + len(phrase)])
            return " ".join(phrase), written
    terms = _key_terms(tokens)
    return (" ".join(terms), "") if terms else None


def _drop_lead_in(question: str) -> str:
    words = question.split(maxsplit=1)
    if len(words) == 2 and words[0].lower().rstrip(",") in _LEAD_INS:
        return words[1]
    return question


def _refers_back(tokens: Sequence[str], at: int) -> bool:
    word = tokens[at].lower()
    if word in _PRONOUNS or word in _POSSESSIVES:
        return True
    if word in _DEMONSTRATIVES:
        following = tokens[at + 1] if at + 1 < len(tokens) else ""
        return not following or not _is_word(following)
    return False


def resolve(question: str, previous: str | None) -> str:
    """``question`` resolved against ``previous``, the standalone form of the question before
    it, by the rule the contract documents for postConversationMessage."""
    question = " ".join(question.split())
    if previous is None:
        return question
    found = _subject(previous)
    if found is None:
        return question
    subject, written = found
    body = _drop_lead_in(question)
    about = _ABOUT.match(body)
    if about and written:
        # "what about X?": the previous question again, X in its subject's place.
        other = about.group(1)
        article = written.split()[0]
        plural = article.lower() in ("a", "an") and other.endswith("s")
        if other.split()[0].lower() not in _ARTICLES and not plural:
            other = f"{article} {other}"
        return previous.replace(written, other, 1)
    tokens = _WORD.findall(body)
    for at, token in enumerate(tokens):
        if _refers_back(tokens, at):
            # A phrase that had an article gets "the"; bare key terms stay bare.
            reference = f"the {subject}" if written else subject
            if token.lower() in _POSSESSIVES:
                reference += "'s"
            start = _token_start(body, tokens, at)
            resolved = body[:start] + reference + body[start + len(token) :]
            return resolved[:1].upper() + resolved[1:]
    if len(_key_terms(tokens)) < _MIN_KEY_TERMS:
        return f"{body} ({subject})"
    return question


def _token_start(text: str, tokens: Sequence[str], at: int) -> int:
    position = 0
    for token in tokens[:at]:
        position = text.index(token, position) + len(token)
    return text.index(tokens[at], position)


class RuleBasedRewriter:
    """Resolves each earlier question against the one before it, then the new one against the
    last: pronouns and "what about X?" need only the questions, not the answers."""

    def standalone(self, question: str, history: Sequence[Exchange]) -> str:
        previous: str | None = None
        for exchange in history:
            previous = resolve(exchange.question, previous)
        return resolve(question, previous)[:MAX_QUESTION_CHARS]


# -- the model --------------------------------------------------------------------------------

REWRITE_PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "You rewrite the last question of a conversation so that it can be understood "
            "without the conversation: replace pronouns and references with what they refer "
            "to and keep everything else, in the question's language. Do not answer it. "
            "Reply with the rewritten question only.",
        ),
        ("human", "Conversation:\n{history}\n\nLast question: {question}\n\nRewritten question:"),
    ]
)


class ChatRewriter:
    """The configured OpenAI-compatible chat model rewrites the question."""

    def __init__(self, settings: Settings) -> None:
        # Imported here: only the openai provider needs them (28 MB, see openai_answer_provider).
        from langchain_openai import ChatOpenAI

        # The answer provider's endpoint and model, with the same key handling (a key is always
        # passed, so OPENAI_API_KEY from the environment never reaches a third-party endpoint).
        openai_api = settings.llm_base_url is None or (
            urlsplit(settings.llm_base_url).hostname == "api.openai.com"
        )
        self._model = ChatOpenAI(
            model=settings.llm_model,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key or SecretStr("unused"),
            timeout=settings.llm_timeout_seconds,
            max_retries=1,
            max_completion_tokens=_REWRITE_TOKENS if openai_api else None,
            extra_body=None if openai_api else {"max_tokens": _REWRITE_TOKENS},
            temperature=0,
        )

    def standalone(self, question: str, history: Sequence[Exchange]) -> str:
        if not history:
            return question
        lines = []
        for exchange in history:
            lines += [f"User: {exchange.question}", f"Assistant: {exchange.answer}"]
        prompt = REWRITE_PROMPT.invoke({"history": "\n".join(lines), "question": question})
        import openai  # loaded already, with ChatOpenAI

        try:
            reply = self._model.invoke(prompt).text
        except openai.APIError as exc:
            raise UpstreamError(
                "the language model endpoint failed to rewrite the question"
            ) from exc
        rewritten = next((line.strip() for line in reply.splitlines() if line.strip()), "")
        return rewritten[:MAX_QUESTION_CHARS] or question


# -- bounds -----------------------------------------------------------------------------------


class QuestionRewriting:
    """The configured rewriter behind the history bounds of the settings."""

    def __init__(self, settings: Settings) -> None:
        self.rewriter: Rewriter = (
            ChatRewriter(settings) if settings.answer_provider == "openai" else RuleBasedRewriter()
        )
        self.max_turns = settings.conversation_history_turns
        self.max_tokens = settings.conversation_history_tokens
        tokenizer = load_tokenizer()
        self.count_tokens: Callable[[str], int] = lambda text: count_tokens(tokenizer, text)

    def bounded(self, history: Sequence[Exchange]) -> list[Exchange]:
        """The newest exchanges within the turn and token bounds, oldest first."""
        kept: list[Exchange] = []
        used = 0
        for exchange in reversed(history[-self.max_turns :]):
            used += self.count_tokens(exchange.question) + self.count_tokens(exchange.answer)
            if used > self.max_tokens:
                break
            kept.append(exchange)
        kept.reverse()
        return kept

    def standalone(self, question: str, history: Sequence[Exchange]) -> str:
        return self.rewriter.standalone(question, self.bounded(history))
