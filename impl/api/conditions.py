"""Request headers that make a request conditional or idempotent: If-Match and If-None-Match
(RFC 9110, section 13) and Idempotency-Key (the IETF draft)."""

from __future__ import annotations

import re

from starlette.requests import Request

from impl.errors import FieldError, InvalidInput
from impl.rag.documents import document_etag
from impl.rag.types import Document

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def etag_header(document: Document) -> str:
    return f'"{document_etag(document)}"'


def _tags(request: Request, name: str, *, weak: bool) -> list[str] | None:
    """The entity tags a condition header lists, unquoted (``*`` as is); None without the
    header. ``weak``: weak tags compare as their strong ones (If-None-Match); else a weak tag
    never matches (If-Match takes strong comparison only) and is left out. A member that is
    not a quoted tag names no state, so it is left out too: it matches nothing."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    tags = []
    for part in raw.split(","):
        tag = part.strip()
        if tag == "*":
            tags.append(tag)
            continue
        is_weak = tag.startswith("W/")
        if is_weak:
            tag = tag[2:]
        quoted = len(tag) >= 2 and tag.startswith('"') and tag.endswith('"')
        if quoted and (weak or not is_weak):
            tags.append(tag[1:-1])
    return tags


def if_match(request: Request) -> list[str] | None:
    return _tags(request, "If-Match", weak=False)


def not_modified(request: Request, document: Document) -> bool:
    """Whether If-None-Match names the document as it is (then the answer is 304)."""
    tags = _tags(request, "If-None-Match", weak=True)
    return tags is not None and ("*" in tags or document_etag(document) in tags)


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1 to 255 printable ASCII characters",
            [FieldError("header/Idempotency-Key", "Not a valid key.")],
        )
    return key
