"""``/ws/2`` over a real socket (uvicorn in this process, and one real ``twinstore serve``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.api.helpers import full_access
from tests.api.test_whoami import ISSUER, token
from tests.conftest import bounded, free_port, new_thing_id
from twinstore.api.app import create_app
from twinstore.api.ws import Session
from twinstore.auth import AuthContext, Authenticator
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings

BASIC = {"authorization": "Basic " + base64.b64encode(b"ditto:ditto").decode()}
OTHER = {"authorization": "Basic " + base64.b64encode(b"other:secret").decode()}


@contextlib.asynccontextmanager
async def serving(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    """The app on a free port of this event loop; yields its ``ws://`` base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, runtime), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        # uvicorn waits for open connections without a bound unless forced
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            server.force_exit = True
        await bounded(task, 15, "uvicorn's shutdown")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ws_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url + "/ws/2"


def topic(entity_id: str, action: str, group: str = "things") -> str:
    namespace, name = entity_id.split(":", 1)
    middle = "things/twin" if group == "things" else "policies"
    return f"{namespace}/{name}/{middle}/commands/{action}"


def command(entity_id: str, action: str, path: str = "/", value: Any = ..., **kw: Any) -> dict[str, Any]:
    group = kw.pop("group", "things")
    envelope: dict[str, Any] = {
        "topic": topic(entity_id, action, group),
        "headers": {"correlation-id": kw.pop("cid", secrets.token_hex(6)), **kw},
        "path": path,
    }
    if value is not ...:
        envelope["value"] = value
    return envelope


async def receive(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), timeout)
    result: dict[str, Any] = json.loads(message)
    return result


async def ask(ws: ClientConnection, envelope: dict[str, Any]) -> dict[str, Any]:
    await ws.send(orjson.dumps(envelope).decode())
    response = await receive(ws)
    assert response["headers"]["correlation-id"] == envelope["headers"]["correlation-id"], response
    return response


async def test_thing_and_policy_commands(ws_url: str) -> None:
    thing_id, policy_id = new_thing_id(), new_thing_id("org.policy")
    async with connect(ws_url, additional_headers=BASIC) as ws:
        created = await ask(ws, command(thing_id, "create", value={"attributes": {"a": 1}}))
        assert created["status"] == 201 and created["value"]["thingId"] == thing_id
        assert created["topic"] == topic(thing_id, "create")
        got = await ask(ws, command(thing_id, "retrieve", "/attributes"))
        assert (got["status"], got["value"]) == (200, {"a": 1})
        assert (await ask(ws, command(thing_id, "modify", "/attributes/a", 2)))["status"] == 204
        merged = await ask(ws, command(thing_id, "merge", "/attributes", {"b": 3}))
        assert merged["status"] == 204
        got = await ask(ws, command(thing_id, "retrieve", "/attributes"))
        assert got["value"] == {"a": 2, "b": 3}
        assert (await ask(ws, command(thing_id, "delete")))["status"] == 204
        gone = await ask(ws, command(thing_id, "retrieve"))
        assert gone["status"] == 404 and gone["topic"] == thing_id.replace(":", "/") + "/things/twin/errors"

        policy = await ask(
            ws, command(policy_id, "create", value=full_access("nginx:ditto"), group="policies")
        )
        assert policy["status"] == 201
        entry = await ask(ws, command(policy_id, "retrieve", "/entries/owner/subjects", group="policies"))
        assert entry["value"] == {"nginx:ditto": {"type": "test"}}
        assert (await ask(ws, command(policy_id, "delete", group="policies")))["status"] == 204


async def test_many_commands_in_flight_are_matched_by_correlation_id(ws_url: str) -> None:
    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await ask(ws, command(thing_id, "create", value={"attributes": {}}))
        sent: dict[str, tuple[str, Any]] = {}
        for i in range(150):  # more than a session's 64 slots
            if i % 3 == 2:
                envelope = command(thing_id, "retrieve", "/policyId")  # concurrent: no order
            else:
                envelope = command(thing_id, "modify", f"/attributes/k{i}", i)
            sent[envelope["headers"]["correlation-id"]] = (envelope["topic"].rsplit("/", 1)[1], i)
            await ws.send(orjson.dumps(envelope).decode())
        answers = [await receive(ws) for _ in sent]
    assert {a["headers"]["correlation-id"] for a in answers} == set(sent)
    for answer in answers:
        action, i = sent[answer["headers"]["correlation-id"]]
        if action == "modify":
            assert (answer["status"], answer["value"], answer["path"]) == (201, i, f"/attributes/k{i}")
        else:
            assert (answer["status"], answer["value"]) == (200, thing_id)


async def test_response_required_false_gets_no_answer(ws_url: str) -> None:
    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await ws.send(
            orjson.dumps(command(thing_id, "create", value={}, **{"response-required": False})).decode()
        )
        await ws.send(
            orjson.dumps(command(thing_id, "retrieve", "/x", **{"response-required": False})).decode()
        )
        # an assertion of absence: no answer comes for the two; the next is the one asked for
        await asyncio.sleep(0.2)
        got = await ask(ws, command(thing_id, "retrieve", "/policyId"))
        assert got["value"] == thing_id


async def test_garbage_and_unsupported_control_messages_keep_the_connection(ws_url: str) -> None:
    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await ws.send("this is not json")
        error = await receive(ws)
        assert error["topic"] == "unknown/unknown/things/twin/errors" and error["status"] == 400
        assert error["value"]["error"] == "json.invalid" and error["path"] == "/"
        await ws.send(
            '{"topic": "org.test/x/things/twin/commands/explode", "headers": {"correlation-id": "c1"}}'
        )
        error = await receive(ws)
        assert error["headers"]["correlation-id"] == "c1"
        assert error["value"]["error"] == "protocoladapter:unknown.topicpath"
        await ws.send(
            "START-SEND-LIVE-COMMANDS"
        )  # events are streamed (test_events_ws); live commands not yet
        error = await receive(ws)
        assert error["status"] == 501 and "START-SEND-LIVE-COMMANDS" in error["value"]["message"]
        await ws.send(b"\xff\xfe binary garbage")
        assert (await receive(ws))["value"]["error"] == "json.invalid"
        created = await ask(ws, command(thing_id, "create", value={}))
        assert created["status"] == 201


async def test_permissions_follow_the_authenticated_subject(ws_url: str) -> None:
    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await ask(ws, command(thing_id, "create", value={}))
    async with connect(ws_url, additional_headers=OTHER) as ws:
        hidden = await ask(ws, command(thing_id, "retrieve"))
        assert hidden["status"] == 404 and hidden["value"]["error"] == "things:thing.notfound"


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"authorization": "Basic " + base64.b64encode(b"ditto:wrong").decode()}, ""),
        ({}, "?access_token=not.a.jwt"),
    ],
)
async def test_unauthenticated_upgrades_are_refused(ws_url: str, headers: dict[str, str], query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url + query, additional_headers=headers):
            pass
    response = refused.value.response
    assert response.status_code == 401
    body = json.loads(response.body or b"{}")
    assert body["error"] == "gateway:authentication.failed" and body["status"] == 401


# ---- JWT: ?access_token= and JWT-TOKEN refresh -----------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def jwt_ws_url(
    tmp_path: Path, settings: Settings, runtime: Runtime, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[str]:
    """The shared runtime, but authenticating bearer tokens of the test issuer."""
    jwks = tmp_path / "jwks.json"
    public = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1"}]}))
    jwt_settings = load_settings(
        {},
        users_file=settings.users_file,
        jwt_issuers=[{"issuer": ISSUER, "prefix": "idp", "audience": "twinstore", "jwks_file": str(jwks)}],
    )
    shared = copy.copy(runtime)
    shared.auth = Authenticator.from_settings(jwt_settings)
    async with serving(settings, shared) as url:
        yield url + "/ws/2"


async def test_access_token_and_refresh(jwt_ws_url: str, signing_key: rsa.RSAPrivateKey) -> None:
    thing_id = new_thing_id()
    async with connect(f"{jwt_ws_url}?access_token={token(signing_key)}") as ws:
        created = await ask(ws, command(thing_id, "create", value={}))
        assert created["status"] == 201
        assert created["value"]["policyId"] == thing_id
        policy = await ask(ws, command(thing_id, "retrieve", "/entries/DEFAULT/subjects", group="policies"))
        assert list(policy["value"]) == ["idp:alice"]

        await ws.send("JWT-TOKEN?jwtToken=" + token(signing_key, sub="bob"))
        hidden = await ask(ws, command(thing_id, "retrieve"))  # now bob, who may not read it
        assert hidden["status"] == 404

        await ws.send("JWT-TOKEN?jwtToken=garbage")
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "JWT-TOKEN refused" in closed.value.rcvd.reason


async def test_bad_access_token_is_refused(jwt_ws_url: str, wrong_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{jwt_ws_url}?access_token={token(wrong_key)}"):
            pass
    assert refused.value.response.status_code == 401
    assert b"signature is not valid" in (refused.value.response.body or b"")


@pytest.mark.slow
async def test_ws_on_a_real_server_process(server_process: Any) -> None:
    server = await asyncio.to_thread(server_process().start)
    thing_id = new_thing_id()
    async with connect(server.url.replace("http", "ws") + "/ws/2", additional_headers=BASIC) as ws:
        assert (await ask(ws, command(thing_id, "create", value={"attributes": {"p": 1}})))["status"] == 201
        got = await ask(ws, command(thing_id, "retrieve", "/attributes/p"))
        assert got["value"] == 1


class StuckClient:
    """A WebSocket whose client sends commands but never reads (the send side hangs)."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.received = 0
        self.closed: tuple[int, str] | None = None

    async def receive(self) -> dict[str, Any]:
        if self.received < len(self.messages):
            self.received += 1
            return {"type": "websocket.receive", "text": self.messages[self.received - 1]}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_a_client_that_does_not_read_is_bounded_and_closed(runtime: Runtime) -> None:
    messages = [orjson.dumps(command(new_thing_id(), "retrieve")).decode() for _ in range(100)]
    client = StuckClient(messages)
    session = Session(
        client,  # type: ignore[arg-type]
        AuthContext(subjects=("nginx:ditto",)),
        runtime,
        max_in_flight=4,
        send_timeout=0.3,
    )
    await asyncio.wait_for(session.run(), 5)
    assert client.closed == (1008, "responses were not read in time")
    assert client.received <= 5  # reading stopped once 4 answers were waiting to be sent
