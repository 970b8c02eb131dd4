"""The UI's side of the HTTP API: a client made by the generated package (generated/client),
one exception for every way a call can fail, and the answer stream read event by event."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

from generated.client import Client
from generated.client.api.ingestion import get_job, stream_job_events
from generated.client.api.retrieval import stream_query
from generated.client.models import (
    Job,
    JobEvent,
    Problem,
    QueryRequest,
    QueryResponse,
    StreamRetrieval,
    StreamToken,
)
from generated.client.types import UNSET, Response, Unset
from impl.settings import Settings

T = TypeVar("T")

# Addresses a server binds to that are no address to connect to: it answers on loopback too.
ANY_ADDRESS = {"", "0.0.0.0", "::"}  # noqa: S104

# Reads wait as long as a slow language model may take to answer; connecting does not.
TIMEOUT = httpx.Timeout(120.0, connect=5.0)

# A job's event stream that drops is resumed this many times in a row (no event received in
# between) before the job is read once instead; the pause before each grows by RESUME_PAUSE.
RESUMES = 3
RESUME_PAUSE = 0.5


def default_api_url() -> str:
    """RAGAPI_UI_API_URL, or else the server that `ragapi serve` starts from the same
    environment and .env: its RAGAPI_HOST and RAGAPI_PORT."""
    if url := os.environ.get("RAGAPI_UI_API_URL"):
        return url
    settings = Settings()
    host = "127.0.0.1" if settings.host in ANY_ADDRESS else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


class ApiError(Exception):
    """A call that failed, told the way the API tells it: a problem's title and detail."""

    def __init__(self, title: str, detail: str) -> None:
        super().__init__(f"{title}: {detail}")
        self.title = title
        self.detail = detail

    @classmethod
    def from_problem(cls, problem: Problem) -> ApiError:
        detail = problem.detail if isinstance(problem.detail, str) else ""
        if isinstance(problem.errors, list):
            fields = "; ".join(f"{e.location}: {e.message}" for e in problem.errors)
            detail = f"{detail} {fields}".strip()
        return cls(problem.title, detail)

    @classmethod
    def from_body(cls, status: int, content: bytes) -> ApiError:
        """From a body that the generated client did not parse (a status the spec does not
        list for that operation): a problem document when it is one, else the raw text."""
        try:
            return cls.from_problem(Problem.from_dict(json.loads(content)))
        except (ValueError, KeyError, TypeError, AttributeError):
            text = content.decode(errors="replace").strip()[:300]
            return cls(f"HTTP {status}", text or "The API gave no reason.")

    @classmethod
    def unreachable(cls, url: str, error: httpx.HTTPError) -> ApiError:
        return cls("Cannot reach the API", f"{url}: {str(error) or type(error).__name__}")


def credential_headers(credential: str) -> dict[str, str]:
    """An access token from the server's identity provider (a JWT: eyJ..., three parts joined
    by dots) goes as Authorization: Bearer; anything else is an API key, sent as X-API-Key."""
    credential = credential.strip()
    if not credential:
        return {}
    if credential.startswith("eyJ") and credential.count(".") == 2:
        return {"Authorization": f"Bearer {credential}"}
    return {"X-API-Key": credential}


def connect(url: str, credential: str) -> Client:
    """A client of the API at `url`, signed in with an API key or an access token when there
    is one."""
    base = url.strip().rstrip("/")
    try:
        scheme = httpx.URL(base).scheme
    except httpx.InvalidURL as error:
        raise ApiError("Not a URL", f"{base}: {error}") from None
    if scheme not in ("http", "https"):
        raise ApiError("Not an API URL", f"{base or 'Nothing'} is not like http://host:port.")
    return Client(base_url=base, headers=credential_headers(credential), timeout=TIMEOUT)


def result(response: Response[T | Problem]) -> T:
    """The parsed body of a successful call; ApiError for anything else."""
    parsed = response.parsed
    if isinstance(parsed, Problem):
        raise ApiError.from_problem(parsed)
    if parsed is None or response.status_code >= 400:
        raise ApiError.from_body(response.status_code, response.content)
    return parsed


def succeeded(response: Response[Any]) -> None:
    """For calls with no body to read (delete): ApiError unless the status says success."""
    if isinstance(response.parsed, Problem):
        raise ApiError.from_problem(response.parsed)
    if response.status_code >= 400:
        raise ApiError.from_body(response.status_code, response.content)


def stream_answer(
    client: Client, question: str, show: Callable[[StreamRetrieval | StreamToken], None]
) -> QueryResponse:
    """Asks through POST /api/v1/query/stream, handing each `retrieval` and `token` event to
    `show` as it arrives; returns the `done` event's answer. A refusal before the stream
    starts, an `error` event, or a stream that ends early raises ApiError."""
    request = stream_query._get_kwargs(body=QueryRequest(question=question))
    with contextlib.closing(_events(client, request)) as events:
        for event in events:
            data = json.loads(event.data)
            if event.event == "retrieval":
                show(StreamRetrieval.from_dict(data))
            elif event.event == "token":
                show(StreamToken.from_dict(data))
            elif event.event == "done":
                return QueryResponse.from_dict(data)
            elif event.event == "error":
                raise ApiError.from_problem(Problem.from_dict(data))
            # Any other event is a later addition to the contract: skipped, not fatal.
    raise ApiError("Answer cut short", "The stream ended before the answer was complete.")


def follow_job(
    client: Client,
    job: Job,
    show: Callable[[Job, str | None], None],
    last_event_id: str | None = None,
) -> Job:
    """Follows `job` by its events (GET /api/v1/jobs/{job_id}/events) from after
    `last_event_id`: each event updates `job` in place (its status; chunks done and total from
    job.progress; status and error from job.finished), which is handed to `show` with the
    event's id, to resume from later. A stream that drops is resumed with Last-Event-ID
    (RESUMES times in a row at most); after that the job is read once with GET instead, and
    that job returned, finished or not."""
    drops = 0
    while True:
        try:
            for event_id, event in job_events(client, job.id, last_event_id):
                drops = 0
                last_event_id = event_id or last_event_id
                apply_event(job, event)
                show(job, last_event_id)
                if event.type_ == "job.finished":
                    return job
        except httpx.TransportError:
            pass  # dropped: resumed below like a stream that ended early
        drops += 1
        if drops > RESUMES:
            return result(get_job.sync_detailed(client=client, job_id=job.id))
        time.sleep(RESUME_PAUSE * drops)


def job_events(
    client: Client, job_id: str, last_event_id: str | None
) -> Iterator[tuple[str | None, JobEvent]]:
    """One connection's worth of the job's events, with their ids, as they arrive. A refusal
    (an unknown job, a missing scope) raises ApiError; a connection that fails or drops,
    httpx.TransportError."""
    request = stream_job_events._get_kwargs(job_id, last_event_id=last_event_id or UNSET)
    with contextlib.closing(_events(client, request)) as events:
        for event in events:
            yield event.id or None, JobEvent.from_dict(json.loads(event.data))


def _events(client: Client, request: dict[str, Any]) -> Generator[ServerSentEvent, None, None]:
    """The server-sent events of a request as the generated client builds it (method, path,
    headers and body from the contract), each as it arrives: the generated functions wait for
    the whole body. A refusal, or a body that is not an event stream, raises ApiError."""
    method, url = request.pop("method"), request.pop("url")
    with connect_sse(client.get_httpx_client(), method, url, **request) as source:
        response = source.response
        if response.status_code != 200:
            raise ApiError.from_body(response.status_code, response.read())
        try:
            yield from source.iter_sse()
        except SSEError as error:
            raise ApiError("Not an event stream", str(error)) from None


def apply_event(job: Job, event: JobEvent) -> None:
    data = event.data
    if event.type_ == "job.queued":
        job.status = "queued"
    elif event.type_ == "job.running":
        job.status = "running"
    elif event.type_ == "job.progress":
        if isinstance(data.chunks_done, int) and isinstance(data.chunks_total, int):
            job.chunks_done, job.chunks_total = data.chunks_done, data.chunks_total
    elif event.type_ == "job.finished":
        if not isinstance(data.status, Unset):
            job.status = data.status
        job.error = None if isinstance(data.error, Unset) else data.error
    # document.ready and document.failed: the job's own events say what the UI shows.
