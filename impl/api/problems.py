"""The one place where errors become RFC 9457 problem documents."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from generated import models
from impl import errors
from impl.rag.chat import UnknownModel

log = logging.getLogger("ragapi.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:ragapi:problem:"
# Operations of the openai tag answer errors in OpenAI's shape, which its SDKs read.
OPENAI_PATH_PREFIX = "/v1/"
OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}

# Most specific class first: the first match wins.
ERROR_MAP: tuple[tuple[type[errors.RagapiError], int, str], ...] = (
    (errors.UnreadableDocument, 400, "unreadable-document"),
    (errors.InvalidInput, 400, "validation-failed"),
    (errors.Unauthenticated, 401, "unauthenticated"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.NotFound, 404, "not-found"),
    (errors.RequestTimeout, 408, "request-timeout"),
    (errors.Conflict, 409, "conflict"),
    (errors.PreconditionFailed, 412, "precondition-failed"),
    (errors.PreconditionRequired, 428, "precondition-required"),
    (errors.IdempotencyKeyReused, 422, "idempotency-key-reused"),
    (errors.WebhookUrlRefused, 422, "webhook-url-refused"),
    (errors.DocumentTooLarge, 413, "document-too-large"),
    (errors.PayloadTooLarge, 413, "payload-too-large"),
    (errors.UnsupportedMediaType, 415, "unsupported-media-type"),
    (errors.RateLimited, 429, "rate-limited"),
    (errors.UpstreamError, 502, "upstream-error"),
    (errors.DependencyUnavailable, 503, "dependency-unavailable"),
    (errors.ServiceUnavailable, 503, "service-unavailable"),
)


class MalformedBody(errors.InvalidInput):
    """The body is not parseable JSON or not UTF-8 (400). Web-only: services never see raw
    bodies."""

    def __init__(self, detail: str, slug: str) -> None:
        super().__init__(detail)
        self.slug = slug


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "unknown"))


def problem_model(
    status: int,
    slug: str,
    detail: str,
    instance: str,
    field_errors: list[errors.FieldError] | None = None,
) -> models.Problem:
    problem = models.Problem(
        type=f"{TYPE_PREFIX}{slug}",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=f"urn:request:{instance}",
    )
    if field_errors:
        problem.errors = [
            models.FieldError(location=e.location, message=e.message) for e in field_errors
        ]
    return problem


def problem_response(
    status: int,
    slug: str,
    detail: str,
    instance: str,
    field_errors: list[errors.FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    problem = problem_model(status, slug, detail, instance, field_errors)
    return Response(
        problem.model_dump_json(),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def classify(exc: errors.RagapiError) -> tuple[int, str]:
    if isinstance(exc, MalformedBody):
        return 400, exc.slug
    for cls, status, slug in ERROR_MAP:
        if isinstance(exc, cls):
            return status, slug
    return 500, "internal-error"


def openai_error_response(
    status: int, slug: str, detail: str, exc: errors.RagapiError | None, headers: dict[str, str]
) -> Response:
    """OpenAI's error body: {"error": {message, type, param, code}}."""
    kind = OPENAI_ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    param = code = None
    message = detail
    if isinstance(exc, UnknownModel):
        param, code = "model", "model_not_found"
    elif isinstance(exc, errors.Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(exc, errors.InvalidInput) and exc.errors:
        param = exc.errors[0].location.removeprefix("body/")
        message += " " + "; ".join(f"{e.location}: {e.message}" for e in exc.errors)
    body = models.OpenAIErrorResponse(
        error=models.OpenAIErrorDetail(
            message=message, type=kind, param=param, code=code or slug.replace("-", "_")
        )
    )
    return Response(
        body.model_dump_json(), status_code=status, media_type="application/json", headers=headers
    )


def response_for_error(exc: errors.RagapiError, rid: str, path: str) -> Response:
    """The error as the operation at ``path`` reports errors: a problem document, or OpenAI's
    error body under /v1/."""
    if not path.startswith(OPENAI_PATH_PREFIX):
        return problem_for_error(exc, rid)
    status, slug = classify(exc)
    if status == 500:
        log.error("unmapped error", exc_info=exc, extra={"request_id": rid})
        detail = "The server failed to handle this request; it has been logged with its id."
        return openai_error_response(500, "internal-error", detail, None, {})
    return openai_error_response(status, slug, exc.detail, exc, error_headers(exc))


def error_headers(exc: errors.RagapiError) -> dict[str, str]:
    if isinstance(exc, errors.RateLimited | errors.DependencyUnavailable):
        return {"Retry-After": str(exc.retry_after_seconds)}
    if isinstance(exc, errors.Unauthenticated):
        return {"WWW-Authenticate": authenticate_challenges(exc)}
    if isinstance(exc, errors.InsufficientScope):
        return {
            "WWW-Authenticate": f'Bearer realm="ragapi", error="insufficient_scope", '
            f'scope="{exc.scope}"'
        }
    if isinstance(exc, errors.RequestTimeout):
        return {"Connection": "close"}  # the rest of a late body is not waited for
    return {}


def authenticate_challenges(exc: errors.Unauthenticated) -> str:
    """The schemes a client may authenticate with (RFC 9110, 11.6.1): a refused bearer token
    says why in RFC 6750's terms; the error's detail says the rest."""
    challenges = []
    if isinstance(exc, errors.InvalidToken):
        challenges.append('Bearer realm="ragapi", error="invalid_token"')
    elif exc.bearer:
        challenges.append('Bearer realm="ragapi"')
    return ", ".join([*challenges, 'ApiKey header="X-API-Key"'])


def problem_for_error(exc: errors.RagapiError, rid: str) -> Response:
    status, slug = classify(exc)
    field_errors = exc.errors if isinstance(exc, errors.InvalidInput) else None
    if status == 500:
        log.error("unmapped error", exc_info=exc, extra={"request_id": rid})
        return internal_error(rid)
    return problem_response(status, slug, exc.detail, rid, field_errors, error_headers(exc))


def internal_error(rid: str) -> Response:
    return problem_response(
        500,
        "internal-error",
        "The server failed to handle this request; it has been logged with this request's id.",
        rid,
    )


async def handle_ragapi_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.RagapiError)
    return response_for_error(exc, request_id(request), request.url.path)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (no such method on a route)."""
    assert isinstance(exc, HTTPException)
    rid = request_id(request)
    openai_path = request.url.path.startswith(OPENAI_PATH_PREFIX)
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        detail = f"{request.method} is not allowed here; allowed: {allowed}."
        if openai_path:
            return openai_error_response(
                405, "method-not-allowed", detail, None, {"Allow": allowed}
            )
        return problem_response(405, "method-not-allowed", detail, rid, headers={"Allow": allowed})
    if exc.status_code == 404:
        detail = f"No resource at {request.url.path}."
        if openai_path:
            return openai_error_response(404, "not-found", detail, None, {})
        return problem_response(404, "not-found", detail, rid)
    # Starlette's form parser reports a malformed multipart body this way.
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    slug = "validation-failed" if exc.status_code == 400 else "http-error"
    return problem_response(exc.status_code, slug, detail, rid)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def handle_request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    field_errors = [
        errors.FieldError("/".join(str(p) for p in e["loc"]), str(e["msg"])) for e in exc.errors()
    ]
    return problem_response(
        400,
        "validation-failed",
        "The request failed validation.",
        request_id(request),
        field_errors,
    )
