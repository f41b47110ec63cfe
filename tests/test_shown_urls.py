"""URLs as serve's banner and logs show them: secrets hidden, hosts kept as written."""

from __future__ import annotations

import pytest

from twinstore.cli import _shown_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (None, "-"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        # several hosts (HA, target_session_attrs) are not one host and port to urlsplit
        (
            "postgresql://u:secret@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgresql://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write",
        ),
        ("postgresql://u:p%40ss@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("nats://a:secret@x:4222,nats://c:other@y:4223", "nats://a:***@x:4222,nats://c:***@y:4223"),
        ("nats://s3cr3t-token@h:4222", "nats://***@h:4222"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_a_shown_url_hides_its_secret(url: str | None, shown: str) -> None:
    assert _shown_url(url) == shown
    assert "secret" not in _shown_url(url) and "other" not in _shown_url(url)
