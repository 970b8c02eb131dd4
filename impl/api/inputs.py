"""Turning a request into the generated models its operation declares.

Every input is validated in pydantic's strict JSON mode, so the models accept exactly what the
JSON Schema allows: no "2" for an integer, no 0 for a date-time, no null where the spec has
none. Query strings are first turned into JSON values by the parameter's declared type (that is
how a query string says 2), then validated the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Depends
from pydantic import MISSING, BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from generated import models
from generated.operations import OPERATIONS, Operation
from impl.api.problems import MalformedBody
from impl.errors import FieldError, InvalidInput, UnsupportedMediaType
from impl.settings import Settings

INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# pydantic also reads "0" as a date-time (a Unix time); JSON Schema's date-time is RFC 3339 only.
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def operation_of(request: Request) -> Operation:
    return OPERATIONS[request.scope["route"].name]


def locations(exc: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) of each failure."""
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        # Union branches add the branch's type name to loc; the client only needs its path.
        loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and p[:1].isupper())]
        found.append(("/".join(loc), error["msg"]))
    return found


def validation_failed(errors: list[FieldError]) -> InvalidInput:
    noun = "field" if len(errors) == 1 else "fields"
    return InvalidInput(f"{len(errors)} {noun} failed validation.", errors)


def body_validation_failed(exc: ValidationError, prefix: str) -> InvalidInput:
    return validation_failed([FieldError(f"{prefix}/{loc}", msg) for loc, msg in locations(exc)])


def query_value(raw: str, json_type: str) -> Any:
    """A query string as the JSON value its schema type reads it as; left a string when it is
    not one, so validation reports it."""
    if json_type == "integer" and INTEGER.fullmatch(raw):
        return int(raw)
    if json_type == "number" and NUMBER.fullmatch(raw):
        return float(raw)
    if json_type == "boolean" and raw in ("true", "false"):
        return raw == "true"
    return raw


async def parse_params(request: Request) -> BaseModel:
    op = operation_of(request)
    assert op.params_model is not None, f"{op.operation_id} declares no parameters"
    values: dict[str, Any] = dict(request.path_params)
    errors = []
    for name, json_type, json_format in op.query_params:
        given = request.query_params.getlist(name)
        if len(given) > 1:
            errors.append(FieldError(f"query/{name}", "Give this parameter once."))
        elif given and json_format == "date-time" and not RFC3339.fullmatch(given[0]):
            errors.append(FieldError(f"query/{name}", "Give an RFC 3339 date-time."))
        elif given:
            values[name] = query_value(given[0], json_type)
    if errors:
        raise validation_failed(errors)
    try:
        return op.params_model.model_validate_json(json.dumps(values), strict=True)
    except ValidationError as exc:
        query_names = {name for name, *_ in op.query_params}
        raise validation_failed(
            [
                FieldError(f"{'query' if loc.split('/')[0] in query_names else 'path'}/{loc}", msg)
                for loc, msg in locations(exc)
            ]
        ) from None


@dataclass(frozen=True)
class UploadedFile:
    filename: str | None
    content_type: str | None
    content: bytes


@dataclass(frozen=True)
class Upload:
    """A multipart ingest: the files and the metadata that applies to each."""

    files: list[UploadedFile]
    metadata: models.Metadata | MISSING  # as in the generated IngestUpload


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def json_number(text: str) -> int | float:
    """JSON Schema counts 2.0 as an integer; pydantic's strict mode would refuse it."""
    value = float(text)
    return int(value) if value.is_integer() else value


TOO_DEEP = "The body nests arrays or objects too deeply to be read."


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def normalized_json(raw: bytes) -> str:
    """The body as canonical JSON text: valid UTF-8, standard JSON only, integral numbers as
    integers, and no lone surrogates (they would fail later, deep in a store)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            f"The body is not valid UTF-8 (byte {exc.start}).", "invalid-utf8"
        ) from None
    try:
        value = json.loads(text, parse_float=json_number, parse_constant=reject_constant)
    except ValueError as exc:
        raise MalformedBody(f"The body is not valid JSON: {exc}.", "malformed-json") from None
    except RecursionError:
        # No body of the contract nests more than a few levels; the parser's recursion
        # guard is the bound, and it must be a client error, not a crash.
        raise MalformedBody(TOO_DEEP, "json-too-deep") from None
    try:
        canonical = json.dumps(value, ensure_ascii=False, allow_nan=False)
        canonical.encode("utf-8")
    except ValueError:  # UnicodeEncodeError too: a lone surrogate escaped as \ud800
        raise MalformedBody(
            "The body holds a number out of range or an unpaired surrogate.", "malformed-json"
        ) from None
    except RecursionError:
        raise MalformedBody(TOO_DEEP, "json-too-deep") from None
    return canonical


async def parse_json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    if not raw:
        raise InvalidInput("The request body is empty.", [FieldError("body", "Required.")])
    try:
        return model.model_validate_json(normalized_json(raw), strict=True)
    except ValidationError as exc:
        raise body_validation_failed(exc, "body") from None


async def parse_multipart(request: Request, settings: Settings) -> Upload:
    form = await request.form(
        max_files=settings.max_files_per_request,
        max_fields=16,
        max_part_size=settings.max_upload_bytes,
    )
    unknown = sorted(set(form.keys()) - {"files", "metadata"})
    if unknown:
        raise InvalidInput(
            "Unknown form fields.",
            [FieldError(f"body/{k}", "Not a field of this form.") for k in unknown],
        )
    files = []
    for item in form.getlist("files"):
        if not isinstance(item, UploadFile):
            raise InvalidInput(
                "files must be file parts.", [FieldError("body/files", "Not a file.")]
            )
        files.append(UploadedFile(item.filename, item.content_type, await item.read()))
    if not files:
        raise InvalidInput("No file was sent.", [FieldError("body/files", "At least one file.")])
    metadata: models.Metadata | MISSING = MISSING
    raw_metadata = form.getlist("metadata")
    if len(raw_metadata) > 1:
        raise InvalidInput("metadata given twice.", [FieldError("body/metadata", "Give it once.")])
    if raw_metadata:
        value = raw_metadata[0]
        text = value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
        try:
            metadata = models.Metadata.model_validate_json(text, strict=True)
        except ValidationError as exc:
            raise body_validation_failed(exc, "body/metadata") from None
    return Upload(files, metadata)


async def parse_body(request: Request) -> BaseModel | Upload:
    op = operation_of(request)
    media_type = media_type_of(request)
    if media_type not in op.body:
        accepted = ", ".join(op.body)
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'} is not accepted here; send {accepted}."
        )
    if media_type == "multipart/form-data":
        settings: Settings = request.state.settings
        return await parse_multipart(request, settings)
    model = op.body[media_type]
    assert model is not None, f"{op.operation_id}: {media_type} body has no named schema"
    return await parse_json_body(request, model)


# Handlers annotate their inputs with these, e.g.
#   params: Annotated[models.GetDocumentParams, PARAMS]
# The routing layer checks at startup that the annotated model is the one the operation declares.
PARAMS: Any = Depends(parse_params)
BODY: Any = Depends(parse_body)
