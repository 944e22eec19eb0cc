"""Settings: documented, checked at start-up, shown by `telemetry config` with secrets hidden."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from api.cli import main
from api.settings import SettingsError, describe, load_settings, mask_secret

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `(TELEMETRY_[A-Z0-9_]+)` \| (.*?) \|")


def readme_settings() -> dict[str, str]:
    """{variable: default cell} of every row of README's settings table."""
    assert README.exists(), (
        "README.md is missing (its settings table: `telemetry config --markdown`)"
    )
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        if match := ROW.match(line):
            rows[match[1]] = match[2]
    return rows


def test_every_setting_is_in_the_readme_table():
    documented = readme_settings()
    declared = {name: default for name, default, _help in describe()}

    assert sorted(declared.keys() - documented.keys()) == [], "undocumented in README.md"
    assert sorted(documented.keys() - declared.keys()) == [], "README.md names unknown settings"
    for name, default in declared.items():
        assert documented[name] == (f"`{default}`" if default else "(empty)"), name


def test_markdown_table_has_a_row_per_setting():
    result = CliRunner().invoke(main, ["config", "--markdown"])

    assert result.exit_code == 0
    rows = [ROW.match(line) for line in result.output.splitlines()]
    assert [m[1] for m in rows if m] == [name for name, _default, _help in describe()]


def test_defaults_match_the_issue():
    settings = load_settings({})

    assert settings.database_url == "sqlite:///./data/telemetry.db"
    assert (settings.hash_period, settings.trusted_proxies) == ("monthly", 0)
    assert (settings.max_batch, settings.sqlite_synchronous) == (500, "NORMAL")


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "value"),
    [
        ("TELEMETRY_RESPECT_DNT", "yes", "respect_dnt", True),
        ("TELEMETRY_RESPECT_DNT", "0", "respect_dnt", False),
        ("TELEMETRY_HASH_PERIOD", " Daily ", "hash_period", "daily"),
        ("TELEMETRY_SQLITE_SYNCHRONOUS", "full", "sqlite_synchronous", "FULL"),
        ("TELEMETRY_QUERY_ALLOWLIST", "a, b,,c", "query_allowlist", ("a", "b", "c")),
        ("TELEMETRY_QUERY_ALLOWLIST", "", "query_allowlist", ()),
        ("TELEMETRY_WORKERS", "", "workers", None),
        ("TELEMETRY_WORKERS", "3", "workers", 3),
        ("TELEMETRY_TRUSTED_PROXIES", "2", "trusted_proxies", 2),
        ("TELEMETRY_COMMIT_DELAY_MS", "0.5", "commit_delay_ms", 0.5),
        ("TELEMETRY_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ],
)
def test_values_are_read_and_coerced(variable, raw, attribute, value):
    assert getattr(load_settings({variable: raw}), attribute) == value


INVALID = [
    ("TELEMETRY_MAX_BATCH", "abc"),
    ("TELEMETRY_MAX_BATCH", "0"),
    ("TELEMETRY_MAX_BODY_BYTES", "-5"),
    ("TELEMETRY_HASH_PERIOD", "weekly"),
    ("TELEMETRY_TRUSTED_PROXIES", "-1"),
    ("TELEMETRY_SALT_GRACE_HOURS", "1.5"),
    ("TELEMETRY_RESPECT_DNT", "maybe"),
    ("TELEMETRY_SQLITE_SYNCHRONOUS", "sometimes"),
    ("TELEMETRY_SQLITE_BUSY_TIMEOUT_MS", "0"),
    ("TELEMETRY_COMMIT_DELAY_MS", "-1"),
    ("TELEMETRY_WORKERS", "two"),
    ("TELEMETRY_LOG_LEVEL", "LOUD"),
]


@pytest.mark.parametrize(("variable", "raw"), INVALID)
def test_invalid_value_names_the_variable(variable, raw):
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: raw})


@pytest.mark.parametrize(("variable", "raw"), INVALID[:4])
def test_telemetry_config_refuses_an_invalid_value(variable, raw):
    result = CliRunner().invoke(main, ["config"], env={variable: raw})

    assert result.exit_code != 0
    assert f"{variable}={raw!r} is invalid" in result.output


def test_unknown_override_is_refused():
    with pytest.raises(SettingsError, match="colour"):
        load_settings({}, colour="blue")


def test_telemetry_config_prints_every_setting_with_the_password_masked():
    url = "postgresql+psycopg://alice:s3cr3t%40x@db.example:5432/telemetry"

    result = CliRunner().invoke(main, ["config"], env={"TELEMETRY_DATABASE_URL": url})

    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [name for name, _d, _h in describe()]
    assert (
        "TELEMETRY_DATABASE_URL=postgresql+psycopg://alice:***@db.example:5432/telemetry" in lines
    )
    assert "s3cr3t" not in result.output


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("sqlite:///./data/telemetry.db", "sqlite:///./data/telemetry.db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("plain-token", "***"),
        ("", ""),
    ],
)
def test_mask_secret(secret, shown):
    assert mask_secret(secret) == shown


def test_one_worker_per_core_on_every_backend_unless_told_otherwise():
    assert load_settings({}).worker_processes == (os.cpu_count() or 1)
    postgres = {"TELEMETRY_DATABASE_URL": "postgresql+psycopg://localhost/telemetry"}
    assert load_settings(postgres).worker_processes == (os.cpu_count() or 1)
    assert load_settings({"TELEMETRY_WORKERS": "3"}).worker_processes == 3
