"""Database and Redis URLs never reach output with their password."""

from __future__ import annotations

import pytest

from ctr.settings import Settings, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ctr:hunter2@db.example:5432/ctr", "postgresql://ctr:***@db.example:5432/ctr"),
        ("postgresql://ctr:p%40ss@db/ctr?sslmode=require", "postgresql://ctr:***@db/ctr?sslmode=require"),
        ("redis://:topsecret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
        ("sqlite:////tmp/features.db", "sqlite:////tmp/features.db"),
        ("postgresql://u:pw@host:notaport/db", "postgresql://u:***@host:notaport/db"),
        ("postgresql://u:pw@[::1/db", "postgresql://***@[::1/db"),  # unparseable: all of the user part hidden
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_repr_hides_secrets() -> None:
    """repr(Settings) (logs, tracebacks) shows neither tokens nor URLs."""
    s = Settings(database_url="postgresql://ctr:hunter2@db/ctr", admin_token="adm1n", internal_token="int3rnal",
                 redis_url="redis://:r3dis@h:1/0")  # fmt: skip
    text = repr(s)
    assert not any(secret in text for secret in ("hunter2", "adm1n", "int3rnal", "r3dis"))


def test_setup_prints_the_database_url_redacted(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctr setup`'s closing line carries the URL through redact_url (the one helper)."""
    import importlib

    from click.testing import CliRunner

    cli_setup = importlib.import_module("ctr.cli.setup")

    monkeypatch.setenv("CTR_DATABASE_URL", "postgresql://ctr:hunter2@127.0.0.1:1/ctr")
    monkeypatch.setattr("ctr.cli.provision.ensure_data", lambda *a, **k: {})
    monkeypatch.setattr("ctr.cli.provision.ensure_model", lambda *a, **k: "ctr_model:x")
    monkeypatch.setattr("ctr.cli.provision.ensure_features", lambda *a, **k: None)
    out = CliRunner().invoke(cli_setup.setup, []).output
    assert "postgresql://ctr:***@127.0.0.1:1/ctr" in out and "hunter2" not in out
