"""Generated response models to HTTP responses."""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # MISSING fields (optional and unset) are left out, as the schema expects.
    return Response(
        model.model_dump_json(by_alias=True),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
