"""Routes built from the operation table, bound to handlers through one explicit map."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import Depends, FastAPI
from starlette.responses import Response

from generated.operations import OPERATIONS, Operation
from impl.api.inputs import BODY, PARAMS
from impl.api.security import authorize
from impl.errors import ConfigurationError

Handler = Callable[..., Any]


def check_binding(operations: Mapping[str, Operation], handlers: Mapping[str, Handler]) -> None:
    """Refuse to start when the spec and the handler map disagree, naming the operationId."""
    missing = sorted(set(operations) - set(handlers))
    extra = sorted(set(handlers) - set(operations))
    problems = [f"operation {op} in openapi/v1.yaml has no handler" for op in missing]
    problems += [f"handler {op} matches no operation in openapi/v1.yaml" for op in extra]
    for op_id in sorted(set(operations) & set(handlers)):
        problems += signature_problems(operations[op_id], handlers[op_id])
    if problems:
        raise ConfigurationError("; ".join(problems))


def signature_problems(op: Operation, handler: Handler) -> list[str]:
    """The parameters model a handler annotates must be the one the operation declares, so a
    contract change that the handler has not followed fails at startup."""
    hints = typing.get_type_hints(handler, include_extras=True)
    found: list[str] = []
    takes = set()
    for name in inspect.signature(handler).parameters:
        hint = hints.get(name)
        for marker in getattr(hint, "__metadata__", ()):
            if marker is PARAMS:
                takes.add("params")
                annotated = typing.get_args(hint)[0]
                if annotated is not op.params_model:
                    expected = getattr(op.params_model, "__name__", "no parameters")
                    found.append(
                        f"handler {op.operation_id} takes {name} as {annotated.__name__}, "
                        f"the spec declares {expected}"
                    )
            elif marker is BODY:
                takes.add("body")
    if op.params_model is not None and "params" not in takes:
        found.append(f"handler {op.operation_id} does not take its parameters")
    if op.body and "body" not in takes:
        found.append(f"handler {op.operation_id} does not take its request body")
    return found


def add_routes(app: FastAPI, handlers: Mapping[str, Handler]) -> None:
    check_binding(OPERATIONS, handlers)
    for op in OPERATIONS.values():
        app.add_api_route(
            op.path,
            handlers[op.operation_id],
            methods=[op.method],
            name=op.operation_id,
            include_in_schema=False,
            response_model=None,
            response_class=Response,
            # Before the handler's own inputs: a request without a key is 401, not 400.
            dependencies=[Depends(authorize)],
        )
