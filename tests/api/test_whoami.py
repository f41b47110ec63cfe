"""GET /api/2/whoami with basic, bearer and pre-authenticated callers; 401 bodies for bad tokens."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.api.helpers import assert_error
from tests.conftest import AUTH
from twinstore.api.app import create_app
from twinstore.auth import Authenticator
from twinstore.runtime import Runtime
from twinstore.settings import load_settings

ISSUER = "https://login.example/realms/plant"
WHOAMI = "/api/2/whoami"


@pytest_asyncio.fixture(loop_scope="session")
async def jwt_client(
    tmp_path: Path, users_file: Path, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose runtime authenticates basic, bearer and pre-auth (never opened:
    whoami needs nothing but authentication)."""
    jwks = tmp_path / "jwks.json"
    public = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1"}]}))
    settings = load_settings(
        {},
        users_file=str(users_file),
        preauth_enabled=True,
        jwt_issuers=[
            {
                "issuer": ISSUER,
                "prefix": "idp",
                "subjects": ["{{ jwt:sub }}", "{{ jwt:groups }}"],
                "audience": "twinstore",
                "jwks_file": str(jwks),
            }
        ],
    )
    runtime = Runtime(settings)
    runtime.auth = Authenticator.from_settings(settings)
    transport = httpx.ASGITransport(app=create_app(settings, runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore") as c:
        yield c


def token(key: rsa.RSAPrivateKey, **extra: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "twinstore", "sub": "alice", "exp": now + 300, **extra}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


async def test_whoami_with_basic(jwt_client: httpx.AsyncClient) -> None:
    r = await jwt_client.get(WHOAMI, auth=AUTH, headers={"correlation-id": "who-1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"subjects": ["nginx:ditto"], "defaultSubject": "nginx:ditto"}
    assert r.headers["correlation-id"] == "who-1"
    assert r.headers["content-type"].startswith("application/json")


async def test_whoami_with_bearer_token_and_groups(
    jwt_client: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey
) -> None:
    r = await jwt_client.get(WHOAMI, headers=bearer(token(signing_key, groups=["operators", "plant-1"])))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "subjects": ["idp:alice", "idp:operators", "idp:plant-1"],
        "defaultSubject": "idp:alice",
    }
    assert r.headers["correlation-id"]  # generated when none was sent


async def test_whoami_with_pre_authenticated_subjects(jwt_client: httpx.AsyncClient) -> None:
    # the test transport's client address is 127.0.0.1, inside the default trusted networks
    r = await jwt_client.get(WHOAMI, headers={"x-ditto-pre-authenticated": "nginx:proxy-user,idp:ops"})
    assert r.status_code == 200, r.text
    assert r.json() == {"subjects": ["nginx:proxy-user", "idp:ops"], "defaultSubject": "nginx:proxy-user"}


async def test_whoami_on_the_shared_client(client: httpx.AsyncClient) -> None:
    r = await client.get(WHOAMI)
    assert r.status_code == 200, r.text
    assert r.json()["defaultSubject"] == "nginx:ditto"


def bad_tokens(key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    return {
        "expired": (token(key, exp=now - 3600), "The JWT expired at"),
        "wrong key": (token(other), "signature is not valid"),
        "wrong audience": (token(key, aud="elsewhere"), "does not contain 'twinstore'"),
        "unknown issuer": (token(key, iss="https://evil.example"), "not a trusted issuer"),
        "malformed": ("abc.def", "not a well-formed JWT"),
        "alg none": (
            jwt.encode({"iss": ISSUER, "sub": "x", "exp": now + 60}, None, algorithm="none"),
            "alg 'none'",
        ),
    }


@pytest.mark.parametrize(
    "name", ["expired", "wrong key", "wrong audience", "unknown issuer", "malformed", "alg none"]
)
async def test_bad_tokens_are_401_with_ditto_body(
    jwt_client: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey, wrong_key: rsa.RSAPrivateKey, name: str
) -> None:
    value, message = bad_tokens(signing_key, wrong_key)[name]
    r = await jwt_client.get(WHOAMI, headers={**bearer(value), "correlation-id": f"bad-{name}"})
    body = assert_error(r, 401, "gateway:authentication.failed")
    assert message in body["message"], body
    assert body["description"] == "Check if your credentials were correct."
    assert "www-authenticate" in r.headers
    assert r.headers["correlation-id"] == f"bad-{name}"


async def test_missing_credentials_are_401(jwt_client: httpx.AsyncClient) -> None:
    r = await jwt_client.get(WHOAMI)
    body = assert_error(r, 401, "gateway:authentication.failed")
    assert body["message"] == "The request is missing the 'Authorization' header."
    assert "www-authenticate" in r.headers


async def test_invalid_pre_authenticated_subject_is_401(jwt_client: httpx.AsyncClient) -> None:
    r = await jwt_client.get(WHOAMI, headers={"x-ditto-pre-authenticated": "no-colon"})
    body = assert_error(r, 401, "gateway:authentication.failed")
    assert "invalid subject" in body["message"]


async def test_whoami_is_in_the_openapi_document(jwt_client: httpx.AsyncClient) -> None:
    r = await jwt_client.get("/api/2/openapi/openapi.json")
    operation = r.json()["paths"][WHOAMI]["get"]
    assert operation["operationId"] == "getWhoami"
    assert operation["tags"] == ["Policies"]
