"""Ditto live messages over real sockets: HTTP and WebSocket senders, WebSocket receivers, NATS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from tests.api.helpers import assert_error, full_access
from tests.api.test_ws import BASIC, OTHER, serving
from tests.conftest import AUTH, new_thing_id
from twinstore.runtime import Runtime
from twinstore.settings import Settings


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def base(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url.replace("ws://", "http://")


def ws(base_url: str, headers: dict[str, str] = BASIC) -> Any:
    return connect(base_url.replace("http://", "ws://") + "/ws/2", additional_headers=headers)


async def text(socket: ClientConnection, timeout: float = 10) -> str:
    message = await asyncio.wait_for(socket.recv(), timeout)
    assert isinstance(message, str)
    return message


async def receive_messages(socket: ClientConnection, query: str = "") -> None:
    await socket.send("START-SEND-MESSAGES" + (f"?{query}" if query else ""))
    assert await text(socket) == "START-SEND-MESSAGES:ACK"


async def next_message(socket: ClientConnection, thing_id: str, timeout: float = 10) -> dict[str, Any]:
    """The next live message envelope about ``thing_id`` (others' are skipped)."""
    prefix = thing_id.replace(":", "/", 1) + "/things/live/messages/"
    while True:
        envelope: dict[str, Any] = json.loads(await text(socket, timeout))
        if envelope.get("topic", "").startswith(prefix):
            return envelope


def respond(
    envelope: dict[str, Any], status: int, value: Any = None, content_type: str = "text/plain"
) -> str:
    """Ditto's documented way of answering a message: same topic and correlation-id, outbox path."""
    headers = envelope["headers"]
    answer: dict[str, Any] = {
        "topic": envelope["topic"],
        "headers": {
            "thing-id": headers["thing-id"],
            "subject": headers["subject"],
            "correlation-id": headers["correlation-id"],
            "content-type": content_type,
            "direction": "FROM",
        },
        "path": envelope["path"].replace("inbox", "outbox"),
        "status": status,
    }
    if value is not None:
        answer["value"] = value
    return json.dumps(answer)


async def make_thing(client: httpx.AsyncClient, thing_id: str, body: dict[str, Any] | None = None) -> None:
    r = await client.put(f"/api/2/things/{thing_id}", json=body or {"features": {"f": {}}})
    assert r.status_code == 201, r.text


@pytest_asyncio.fixture(loop_scope="session")
async def http(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, auth=AUTH, timeout=30) as c:
        yield c


async def test_http_message_is_answered_by_a_websocket_receiver(
    base: str, http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    async with ws(base) as receiver:
        await receive_messages(receiver)
        sending = asyncio.create_task(
            http.post(
                f"/api/2/things/{thing_id}/inbox/messages/ask/question",
                content=b"Hey, how are you?",
                headers={"content-type": "text/plain", "correlation-id": "cid-ask-1"},
            )
        )
        got = await next_message(receiver, thing_id)
        assert got["topic"] == thing_id.replace(":", "/") + "/things/live/messages/ask/question"
        assert got["path"] == "/inbox/messages/ask/question" and got["value"] == "Hey, how are you?"
        headers = got["headers"]
        assert headers["correlation-id"] == "cid-ask-1" and headers["direction"] == "TO"
        assert headers["content-type"] == "text/plain" and headers["thing-id"] == thing_id
        assert headers["subject"] == "ask/question" and headers["ditto-originator"] == "nginx:ditto"
        await receiver.send(respond(got, 418, "I do not know, since i am only a coffee machine."))
        r = await asyncio.wait_for(sending, 10)
        assert r.status_code == 418 and r.text == "I do not know, since i am only a coffee machine."
        assert (
            r.headers["content-type"].startswith("text/plain") and r.headers["correlation-id"] == "cid-ask-1"
        )


async def test_feature_outbox_message_with_json_and_a_json_answer(
    base: str, http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    async with ws(base) as receiver:
        await receive_messages(receiver, "namespaces=" + thing_id.split(":")[0])
        sending = asyncio.create_task(
            http.post(f"/api/2/things/{thing_id}/features/f/outbox/messages/smoke", json={"level": 3})
        )
        got = await next_message(receiver, thing_id)
        assert got["path"] == "/features/f/outbox/messages/smoke" and got["value"] == {"level": 3}
        assert got["headers"]["feature-id"] == "f" and got["headers"]["direction"] == "FROM"
        await receiver.send(respond(got, 200, {"ok": True}, "application/json"))
        r = await asyncio.wait_for(sending, 10)
        assert r.status_code == 200 and r.json() == {"ok": True}
        # A 204 answer has no body.
        sending = asyncio.create_task(http.post(f"/api/2/things/{thing_id}/features/f/inbox/messages/reset"))
        got = await next_message(receiver, thing_id)
        await receiver.send(respond(got, 204))
        r = await asyncio.wait_for(sending, 10)
        assert r.status_code == 204 and r.content == b""


async def test_timeout_zero_is_accepted_at_once_and_still_delivered(
    base: str, http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    async with ws(base) as receiver:
        await receive_messages(receiver)
        r = await http.post(
            f"/api/2/things/{thing_id}/inbox/messages/fire", params={"timeout": "0"}, content=b"x"
        )
        assert r.status_code == 202 and r.content == b""
        assert (await next_message(receiver, thing_id))["value"] == "x"
        r = await http.post(
            f"/api/2/things/{thing_id}/inbox/messages/fire",
            headers={"response-required": "false"},
            content=b"y",
        )
        assert r.status_code == 202
        assert (await next_message(receiver, thing_id))["value"] == "y"


async def test_no_answer_is_a_408_and_timeouts_are_bounded(
    http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    started = time.monotonic()
    r = await http.post(f"/api/2/things/{thing_id}/inbox/messages/ask", params={"timeout": "1"}, content=b"?")
    assert 0.9 <= time.monotonic() - started < 5
    body = assert_error(r, 408, "messages:message.timeout")
    assert body["message"] == "The Message reached the specified timeout of 1 seconds."
    r = await http.post(
        f"/api/2/things/{thing_id}/inbox/messages/ask", headers={"timeout": "61"}, content=b"?"
    )
    body = assert_error(r, 400, "messages:timeout.invalid")
    assert body["message"] == "Timeout 61 seconds is not inside its allowed bounds 0 - 60 seconds!"
    r = await http.post(
        f"/api/2/things/{thing_id}/inbox/messages/ask", params={"timeout": "soon"}, content=b"?"
    )
    assert_error(r, 400, "messages:timeout.invalid")
    r = await http.post(f"/api/2/things/{thing_id}/inbox/messages/a%20b", params={"timeout": "0"})
    assert_error(r, 400, "messages:subject.invalid")
    r = await http.post(
        f"/api/2/things/{thing_id}/inbox/messages/j",
        params={"timeout": "0"},
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, "json.invalid")


async def test_permissions_to_send_and_to_receive(
    base: str, http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:ditto")
    policy["entries"]["other"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "message:/features/f/outbox": {"grant": ["READ"], "revoke": []},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    shared, private = new_thing_id(), new_thing_id()
    await make_thing(client, shared, {"policyId": policy_id, "features": {"f": {}}})
    await make_thing(client, private)  # default policy: nginx:ditto only
    async with (
        httpx.AsyncClient(base_url=base, auth=("other", "secret"), timeout=30) as other,
        ws(base, OTHER) as receiver,
    ):
        await receive_messages(receiver)
        zero = {"timeout": "0"}
        # nginx:other may read the thing but not send: 403; may not see the private one: 404.
        r = await other.post(f"/api/2/things/{shared}/inbox/messages/go", params=zero)
        body = assert_error(r, 403, "messages:send.notallowed")
        assert body["message"] == f"You are not allowed to send messages for the Thing with id '{shared}'!"
        assert_error(
            await other.post(f"/api/2/things/{private}/inbox/messages/go", params=zero),
            404,
            "things:thing.notfound",
        )
        r = await http.post(f"/api/2/things/{new_thing_id()}/inbox/messages/go", params=zero)
        assert_error(r, 404, "things:thing.notfound")
        # Messages it may not READ never arrive; the first one it gets is the readable one.
        for path in ("/inbox/messages/a", "/features/f/inbox/messages/b", "/outbox/messages/c"):
            assert (
                await http.post(f"/api/2/things/{shared}{path}", params=zero, content=b"hidden")
            ).status_code == 202
        assert (
            await http.post(f"/api/2/things/{private}/features/f/outbox/messages/d", params=zero)
        ).status_code == 202
        r = await http.post(
            f"/api/2/things/{shared}/features/f/outbox/messages/e", params=zero, content=b"seen"
        )
        assert r.status_code == 202
        got = json.loads(await text(receiver))
        assert got["path"] == "/features/f/outbox/messages/e" and got["value"] == "seen"


async def test_websocket_sends_a_message_and_gets_the_answer(base: str, client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    namespace, name = thing_id.split(":")
    async with ws(base) as sender, ws(base) as receiver, ws(base) as bystander:
        await receive_messages(sender)  # its own message is not echoed to it
        await receive_messages(receiver)
        message = {
            "topic": f"{namespace}/{name}/things/live/messages/heatUp",
            "headers": {"correlation-id": "ws-1", "content-type": "text/plain", "timeout": "5"},
            "path": "/features/f/inbox/messages/heatUp",
            "value": "47",
        }
        await sender.send(json.dumps(message))
        got = await next_message(receiver, thing_id)
        assert (got["value"], got["headers"]["correlation-id"], got["headers"]["feature-id"]) == (
            "47",
            "ws-1",
            "f",
        )
        # A session that did not receive the message cannot answer it.
        await bystander.send(respond(got, 500, "spoofed"))
        # an assertion of absence: the spoof has no effect to wait for; it is handled before the
        # real answer, so a spoof taken would be what the sender sees
        await asyncio.sleep(0.2)
        await receiver.send(respond(got, 200, "heating"))
        answer = json.loads(await text(sender))
        assert answer["status"] == 200 and answer["value"] == "heating"
        assert answer["headers"]["correlation-id"] == "ws-1"
        # Without an answer: Ditto's timeout error on the live errors topic.
        message["headers"] = {"correlation-id": "ws-2", "timeout": "1"}
        await sender.send(json.dumps(message))
        await next_message(receiver, thing_id)
        error = json.loads(await text(sender))
        assert error["topic"] == f"{namespace}/{name}/things/live/errors" and error["status"] == 408
        assert error["value"]["error"] == "messages:message.timeout"
        # Not allowed: the error on the same topic.
        async with ws(base, OTHER) as stranger:
            message["headers"] = {"correlation-id": "ws-3"}
            await stranger.send(json.dumps(message))
            error = json.loads(await text(stranger))
            assert error["status"] == 404 and error["headers"]["correlation-id"] == "ws-3"


async def test_stop_send_messages_stops_and_a_filter_selects(
    base: str, http: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    wanted, unwanted = new_thing_id(), new_thing_id()
    await make_thing(client, wanted)
    await make_thing(client, unwanted)
    zero = {"timeout": "0"}
    async with ws(base) as receiver:
        await receive_messages(receiver, f'filter=eq(thingId,"{wanted}")')
        await http.post(f"/api/2/things/{unwanted}/inbox/messages/x", params=zero, content=b"1")
        await http.post(f"/api/2/things/{wanted}/inbox/messages/x", params=zero, content=b"2")
        got = json.loads(await text(receiver))
        assert got["headers"]["thing-id"] == wanted and got["value"] == "2"
        await receiver.send("STOP-SEND-MESSAGES")
        assert await text(receiver) == "STOP-SEND-MESSAGES:ACK"
        await http.post(f"/api/2/things/{wanted}/inbox/messages/x", params=zero, content=b"3")
        with pytest.raises(TimeoutError):
            await text(receiver, 0.5)


async def test_the_service_emits_a_feature_outbox_message(
    base: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    assert runtime.messages is not None
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    async with ws(base) as receiver:
        await receive_messages(receiver)
        sent = await runtime.messages.send_from_feature(thing_id, "f", "anomaly", {"score": 0.97})
        got = await next_message(receiver, thing_id)
        assert got["path"] == "/features/f/outbox/messages/anomaly" and got["value"] == {"score": 0.97}
        assert got["headers"]["content-type"] == "application/json"
        assert got["headers"]["correlation-id"] == sent.correlation_id


@pytest.mark.slow
async def test_a_message_sent_to_one_process_is_answered_through_another(
    server_process: Any, client: httpx.AsyncClient
) -> None:
    """HTTP to process A, WebSocket receiver on process B, the answer back to A's caller."""
    writer, reader = await asyncio.gather(
        asyncio.to_thread(server_process().start), asyncio.to_thread(server_process().start)
    )
    thing_id = new_thing_id()
    await make_thing(client, thing_id)
    async with (
        httpx.AsyncClient(base_url=writer.url, auth=AUTH, timeout=30) as http,
        ws(reader.url) as receiver,
    ):
        await receive_messages(receiver)
        sending = asyncio.create_task(
            http.post(f"/api/2/things/{thing_id}/inbox/messages/ping", content=b"ping")
        )
        got = await next_message(receiver, thing_id)
        await receiver.send(respond(got, 200, "pong"))
        r = await asyncio.wait_for(sending, 10)
        assert r.status_code == 200 and r.text == "pong"
