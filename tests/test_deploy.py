"""deploy/: the compose file and the Dockerfile set only variables ragapi reads, every ragapi
process of the topology uses the same stores, and the image runs as an unprivileged user.
(Docker itself does not run here; these hold the files to the code they configure.)"""

from __future__ import annotations

import re
from typing import Any

import yaml

from impl.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SETTINGS = {f"RAGAPI_{name.upper()}" for name in Settings.model_fields}
STORES = ("RAGAPI_REGISTRY_URL", "RAGAPI_CHROMA_URL", "RAGAPI_DATA_DIR")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, written as a mapping or as a list of NAME=value."""
    given = service.get("environment") or {}
    if isinstance(given, list):
        return dict(item.split("=", 1) for item in given)
    return {name: str(value) for name, value in given.items()}


def ragapi_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("command", [""])[0] == "ragapi"
    }


def dockerfile_ragapi_variables() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env_lines = [line for line in text.splitlines() if line.strip().startswith("ENV ")]
    return {name for line in env_lines for name in re.findall(r"\b(RAGAPI_\w+)=", line)}


def test_every_ragapi_variable_is_a_setting() -> None:
    used: dict[str, set[str]] = {"Dockerfile": dockerfile_ragapi_variables()}
    for name, service in compose()["services"].items():
        used[f"compose service {name}"] = {v for v in environment(service) if "RAGAPI" in v}
    unknown = {where: sorted(names - SETTINGS) for where, names in used.items() if names - SETTINGS}
    assert unknown == {}
    assert used["compose service api"], "the API is configured by environment"


def test_the_topology_runs_api_worker_and_migrations_on_the_same_stores() -> None:
    services = ragapi_services()
    commands = {name: " ".join(service["command"]) for name, service in services.items()}
    assert sorted(commands.values()) == ["ragapi db upgrade", "ragapi serve", "ragapi worker"]
    stores = {name: {v: environment(s).get(v) for v in STORES} for name, s in services.items()}
    assert all(value for values in stores.values() for value in values.values()), stores
    assert len({tuple(values.items()) for values in stores.values()}) == 1, stores
    # Several API processes need the shared rate-limit storage (ragapi serve refuses otherwise).
    api = environment(compose()["services"]["api"])
    assert int(api["RAGAPI_WORKERS"]) > 1
    assert api["RAGAPI_RATE_LIMIT_STORAGE_URL"].startswith("redis://")


def test_the_image_runs_as_an_unprivileged_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
