"""The one exception hierarchy of ragapi.

Services raise these; the web layer maps each class to an RFC 9457 problem in exactly one place
(impl/api/problems.py). Messages are written for the API's users: they must never carry stack
traces, file system paths or internal identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    """One failed check on one input field. ``location`` is a JSON-pointer-like path such as
    ``body/top_k`` or ``query/limit``."""

    location: str
    message: str


class RagapiError(Exception):
    """Base of every error ragapi reports to a client."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(RagapiError):
    """The request is malformed or fails validation (400)."""

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class UnreadableDocument(InvalidInput):
    """A file is empty, corrupt, or holds no text (400)."""


class DocumentTooLarge(RagapiError):
    """A document exceeds a configured bound: pages, decompressed size, characters or parse
    time (413)."""


class PayloadTooLarge(RagapiError):
    """The request body exceeds the configured size (413)."""


class RequestTimeout(RagapiError):
    """The client took longer than allowed to send the request's body (408)."""


class UnsupportedMediaType(RagapiError):
    """A body or file of a type ragapi does not take (415)."""


class NotFound(RagapiError):
    """The resource does not exist, or belongs to another tenant (404)."""


class Conflict(RagapiError):
    """The request conflicts with the resource's current state (409)."""


class PreconditionFailed(RagapiError):
    """An If-Match condition does not hold: the resource changed (412)."""


class PreconditionRequired(RagapiError):
    """The server takes changes only with If-Match, and none was given (428)."""


class IdempotencyKeyReused(RagapiError):
    """An Idempotency-Key came back with another request body (422)."""


class WebhookUrlRefused(RagapiError):
    """A webhook URL whose host is, or resolves only to, non-public addresses (422)."""


class Unauthenticated(RagapiError):
    """No valid credentials (401). ``bearer``: the operation takes a bearer credential too, so
    the client is told it may send one (WWW-Authenticate: Bearer)."""

    def __init__(self, detail: str, *, bearer: bool = False) -> None:
        super().__init__(detail)
        self.bearer = bearer


class InvalidToken(Unauthenticated):
    """A bearer token that is malformed, expired, not for this API, from another issuer or
    not signed by the provider (401, error="invalid_token" as RFC 6750 has it)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, bearer=True)


class Forbidden(RagapiError):
    """Valid credentials without the needed scope (403)."""


class InsufficientScope(Forbidden):
    """A valid bearer token without the needed scope (403, error="insufficient_scope" as RFC
    6750 has it, naming the scope)."""

    def __init__(self, detail: str, scope: str) -> None:
        super().__init__(detail)
        self.scope = scope


class RateLimited(RagapiError):
    """Too many requests (429)."""

    def __init__(self, detail: str, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.retry_after_seconds = retry_after_seconds


class ServiceUnavailable(RagapiError):
    """A dependency is down or a queue is full (503)."""


class DependencyUnavailable(ServiceUnavailable):
    """A store the request needs (the rate-limit storage, ...) does not answer (503, with
    Retry-After)."""

    def __init__(self, detail: str, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.retry_after_seconds = retry_after_seconds


class UpstreamError(RagapiError):
    """An external model endpoint failed or answered nonsense (502)."""


class ConfigurationError(RagapiError):
    """Settings or stores disagree (for example a vector store made with another embedding
    model); raised at startup, never mid-request."""
