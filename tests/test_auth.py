"""Basic authentication against an htpasswd file, with a verification cache."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt
import pytest

from twinstore.auth import BasicAuth, default_dev_users
from twinstore.model.errors import AuthenticationError


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# comment\n"
        f"alice:{bcrypt.hashpw(b'wonder', bcrypt.gensalt(4)).decode()}\n"
        # Apache htpasswd -B writes $2y$
        f"bob:{bcrypt.hashpw(b'builder', bcrypt.gensalt(4)).decode().replace('$2b$', '$2y$')}\n"
    )
    return path


async def test_valid_credentials_give_nginx_subject(users: Path) -> None:
    auth = BasicAuth(users)
    assert await auth.authenticate(basic("alice", "wonder")) == "nginx:alice"
    assert await auth.authenticate(basic("bob", "builder")) == "nginx:bob"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic !!!",
        basic("alice", "wrong"),
        basic("nobody", "x"),
        "Basic " + base64.b64encode(b"alice").decode(),
    ],
)
async def test_invalid_credentials_are_401(users: Path, header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        await BasicAuth(users).authenticate(header)


async def test_bcrypt_runs_once_per_credentials(users: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    auth = BasicAuth(users)
    for _ in range(20):
        assert await auth.authenticate(basic("alice", "wonder")) == "nginx:alice"
    assert len(calls) == 1
    with pytest.raises(AuthenticationError):
        await auth.authenticate(basic("alice", "wrong"))
    assert len(calls) == 2  # a wrong password is never served from the cache


async def test_changed_users_file_drops_cached_credentials(users: Path) -> None:
    auth = BasicAuth(users)
    assert await auth.authenticate(basic("alice", "wonder")) == "nginx:alice"
    users.write_text(f"carol:{bcrypt.hashpw(b'c', bcrypt.gensalt(4)).decode()}\n")
    with pytest.raises(AuthenticationError):
        await auth.authenticate(basic("alice", "wonder"))


async def test_no_users_file_refuses_everyone() -> None:
    with pytest.raises(AuthenticationError):
        await BasicAuth(None).authenticate(basic("ditto", "ditto"))


async def test_dev_default_user_is_ditto(tmp_path: Path) -> None:
    path = default_dev_users(tmp_path)
    assert await BasicAuth(path).authenticate(basic("ditto", "ditto")) == "nginx:ditto"
    path.write_text(f"ditto:{bcrypt.hashpw(b'other', bcrypt.gensalt(4)).decode()}\n")
    assert default_dev_users(tmp_path) == path  # an existing file is never overwritten
    with pytest.raises(AuthenticationError):
        await BasicAuth(path).authenticate(basic("ditto", "ditto"))
