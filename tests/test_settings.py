"""Settings: one object, RAGAPI_ prefix, .env support, every field documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from impl.settings import Settings
from tests.conftest import ROOT


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGAPI_PORT", "9123")
    monkeypatch.setenv("RAGAPI_ANSWER_PROVIDER", "openai")
    settings = Settings()
    assert settings.port == 9123
    assert settings.answer_provider == "openai"


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("RAGAPI_CHUNK_TOKENS=120\n")
    assert Settings().chunk_tokens == 120


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGAPI_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()


def test_registry_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_registry_url == f"sqlite:///{tmp_path.resolve()}/registry.db"
    assert Settings(registry_url="postgresql://db/ragapi").resolved_registry_url.startswith(
        "postgresql"
    )


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    documented = set(re.findall(r"`RAGAPI_([A-Z_]+)`", table))
    assert documented == {name.upper() for name in Settings.model_fields}
