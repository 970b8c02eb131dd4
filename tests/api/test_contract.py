"""The contract is the source of truth: the served spec, the routes and generated/ follow it."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from generated.operations import OPERATIONS
from impl.api.app import create_app
from impl.api.handlers import HANDLERS
from impl.api.routing import check_binding
from impl.errors import ConfigurationError
from tests.conftest import ROOT

SPEC_PATH = ROOT / "openapi" / "v1.yaml"


def spec() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(SPEC_PATH.read_text())


def test_spec_is_valid_openapi_3_1() -> None:
    document = spec()
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_json_body_of_every_operation_has_an_example() -> None:
    document = spec()
    schemas = document["components"]["schemas"]

    def has_example(media: dict) -> bool:  # type: ignore[type-arg]
        if "example" in media or "examples" in media:
            return True
        name = media.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
        return "example" in schemas.get(name, {})

    missing = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            bodies = op.get("requestBody", {}).get("content", {})
            for status, response in op["responses"].items():
                if status.startswith("2"):
                    bodies = {**bodies, **response.get("content", {})}
            missing += [
                f"{method} {path} {media_type}"
                for media_type, media in bodies.items()
                if media_type == "application/json" and not has_example(media)
            ]
    assert not missing


def test_served_json_is_the_yaml_file(client: httpx.Client) -> None:
    served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/json")
    assert served.json() == spec()
    raw = client.get("/openapi.yaml")
    assert raw.status_code == 200
    assert raw.content == SPEC_PATH.read_bytes()


def test_swagger_and_redoc_render_with_local_assets_only(client: httpx.Client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assert "/openapi.json" in html.text
        assert not re.findall(r"https?://", html.text), f"{page} refers to an external URL"
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html.text)
        assert assets
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_every_route_matches_an_operation_and_every_operation_a_route() -> None:
    app = create_app()
    served = {
        (method, route.path)
        for route in app.routes
        if route.name in OPERATIONS
        for method in getattr(route, "methods", ())
        if method != "HEAD"
    }
    declared = {(op.method, op.path) for op in OPERATIONS.values()}
    paths = spec()["paths"]
    in_spec = {(m.upper(), p) for p, item in paths.items() for m in item if m != "parameters"}
    assert served == declared == in_spec


def test_every_dependency_runs_on_the_event_loop() -> None:
    """FastAPI runs a plain function in a worker thread: a dependency that only reads the
    request would cost every request a thread round trip."""

    def plain_functions(dependant: Dependant) -> list[str]:
        call = dependant.call
        found = [] if call is None or inspect.iscoroutinefunction(call) else [call.__qualname__]
        for sub in dependant.dependencies:
            found += plain_functions(sub)
        return found

    app = create_app()
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert {route.name for route in routes} >= set(OPERATIONS)
    assert [(route.name, plain_functions(route.dependant)) for route in routes] == [
        (route.name, []) for route in routes
    ]


def test_binding_refuses_a_missing_handler_naming_the_operation() -> None:
    partial = {k: v for k, v in HANDLERS.items() if k != "getJob"}
    with pytest.raises(ConfigurationError, match=r"operation getJob in openapi/v1\.yaml"):
        check_binding(OPERATIONS, partial)


def test_binding_refuses_a_handler_for_no_operation() -> None:
    with pytest.raises(ConfigurationError, match="handler legacyThing matches no operation"):
        check_binding(OPERATIONS, {**HANDLERS, "legacyThing": HANDLERS["getHealth"]})


def test_binding_refuses_a_handler_whose_parameters_differ_from_the_spec() -> None:
    wrong = {**HANDLERS, "getJob": HANDLERS["getDocument"]}
    with pytest.raises(
        ConfigurationError, match="handler getJob takes params as GetDocumentParams"
    ):
        check_binding(OPERATIONS, wrong)


def test_serve_refuses_to_start_without_a_handler(tmp_path: Path) -> None:
    code = (
        "from impl.api.handlers import HANDLERS; del HANDLERS['listDocumentChunks'];"
        "from impl.cli import main; raise SystemExit(main(['serve', '--port', '0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"RAGAPI_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "listDocumentChunks" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_spec_edit_without_regenerating_fails_the_check_with_a_diff(tmp_path: Path) -> None:
    for part in ("openapi", "generated", "scripts"):
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    edited = tmp_path / "openapi" / "v1.yaml"
    edited.write_text(
        edited.read_text().replace(
            "maximum: 50\n          default: 5", "maximum: 60\n          default: 5"
        )
    )
    result = subprocess.run(
        [sys.executable, "scripts/generate.py", "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "le=60" in result.stdout and "le=50" in result.stdout
    assert "generated/ is stale" in result.stdout
