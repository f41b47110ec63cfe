"""The Ditto Protocol adapter (``twinstore.protocol``) on the real runtime: commands, responses, errors."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.api.helpers import full_access
from tests.conftest import new_thing_id
from twinstore import protocol
from twinstore.auth import AuthContext
from twinstore.runtime import Runtime

DITTO = AuthContext(subjects=("nginx:ditto",))
OTHER = AuthContext(subjects=("nginx:other",))


def topic(entity_id: str, action: str, group: str = "things") -> str:
    namespace, name = entity_id.split(":", 1)
    if group == "things":
        return f"{namespace}/{name}/things/twin/commands/{action}"
    return f"{namespace}/{name}/policies/commands/{action}"


def command(
    entity_id: str, action: str, path: str = "/", value: Any = ..., group: str = "things", **headers: Any
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "topic": topic(entity_id, action, group),
        "headers": {"correlation-id": secrets.token_hex(4), **headers},
        "path": path,
    }
    if value is not ...:
        envelope["value"] = value
    return envelope


async def run(runtime: Runtime, envelope: Any, auth: AuthContext = DITTO) -> dict[str, Any]:
    response = await protocol.handle(envelope, auth, runtime)
    assert response is not None
    if isinstance(envelope, dict) and "correlation-id" in envelope.get("headers", {}):
        assert response["headers"]["correlation-id"] == envelope["headers"]["correlation-id"]
    return response


def assert_error(response: dict[str, Any], status: int, error: str, errors_topic: str) -> dict[str, Any]:
    assert response["status"] == status, response
    assert response["topic"] == errors_topic, response
    assert response["path"] == "/"
    body: dict[str, Any] = response["value"]
    assert body["status"] == status and body["error"] == error, body
    assert body["message"] and body["description"], body
    return body


def errors_of(thing_id: str) -> str:
    namespace, name = thing_id.split(":", 1)
    return f"{namespace}/{name}/things/twin/errors"


async def test_thing_lifecycle(runtime: Runtime, thing_id: str) -> None:
    created = await run(runtime, command(thing_id, "create", value={"attributes": {"a": 1}}))
    assert created["status"] == 201
    assert created["topic"] == topic(thing_id, "create") and created["path"] == "/"
    assert created["value"]["thingId"] == thing_id and created["value"]["attributes"] == {"a": 1}
    assert created["value"]["policyId"] == thing_id
    assert created["headers"]["response-required"] is False and created["headers"]["etag"] == '"rev:1"'

    got = await run(runtime, command(thing_id, "retrieve"))
    assert got["status"] == 200 and got["value"]["attributes"] == {"a": 1}

    feature = await run(runtime, command(thing_id, "modify", "/features/f", {"properties": {}}))
    assert feature["status"] == 201 and feature["value"] == {"properties": {}}
    new = await run(runtime, command(thing_id, "modify", "/features/f/properties/x", 5))
    assert (new["status"], new["value"], new["path"]) == (201, 5, "/features/f/properties/x")
    again = await run(runtime, command(thing_id, "modify", "/features/f/properties/x", 6))
    assert again["status"] == 204 and "value" not in again

    merged = await run(
        runtime,
        command(
            thing_id,
            "merge",
            "/attributes",
            {"a": None, "b": {"c": 2}},
            **{"content-type": "application/merge-patch+json"},
        ),
    )
    assert merged["status"] == 204 and "value" not in merged
    got = await run(runtime, command(thing_id, "retrieve", "/attributes"))
    assert got["value"] == {"b": {"c": 2}}

    deleted = await run(runtime, command(thing_id, "delete", "/attributes/b"))
    assert deleted["status"] == 204
    fields = command(thing_id, "retrieve")
    fields["fields"] = "thingId,features/f/properties"
    got = await run(runtime, fields)
    assert got["value"] == {"thingId": thing_id, "features": {"f": {"properties": {"x": 6}}}}

    assert (await run(runtime, command(thing_id, "delete")))["status"] == 204
    gone = await run(runtime, command(thing_id, "retrieve"))
    assert_error(gone, 404, "things:thing.notfound", errors_of(thing_id))


async def test_create_of_an_existing_thing_is_409(runtime: Runtime, thing_id: str) -> None:
    await run(runtime, command(thing_id, "create", value={}))
    conflict = await run(runtime, command(thing_id, "create", value={}))
    assert_error(conflict, 409, "things:thing.conflict", errors_of(thing_id))


async def test_modify_creates_a_whole_thing_and_merge_of_a_missing_thing_is_404(
    runtime: Runtime, thing_id: str
) -> None:
    missing = await run(runtime, command(thing_id, "merge", "/attributes", {"a": 1}))
    assert_error(missing, 404, "things:thing.notfound", errors_of(thing_id))
    created = await run(runtime, command(thing_id, "modify", "/", {"attributes": {"a": 1}}))
    assert created["status"] == 201 and created["value"]["thingId"] == thing_id


async def test_preconditions(runtime: Runtime, thing_id: str) -> None:
    await run(runtime, command(thing_id, "create", value={"attributes": {"a": 1}}))
    failed = await run(runtime, command(thing_id, "modify", "/attributes/a", 2, **{"if-match": '"rev:9"'}))
    assert_error(failed, 412, "things:precondition.failed", errors_of(thing_id))
    ok = await run(runtime, command(thing_id, "modify", "/attributes/a", 2, **{"If-Match": '"rev:1"'}))
    assert ok["status"] == 204


async def test_correlation_id_is_generated_when_missing(runtime: Runtime, thing_id: str) -> None:
    response = await run(runtime, {"topic": topic(thing_id, "create"), "path": "/", "value": {}})
    assert response["status"] == 201
    assert isinstance(response["headers"]["correlation-id"], str) and response["headers"]["correlation-id"]


async def test_response_required_false_answers_nothing(runtime: Runtime, thing_id: str) -> None:
    quiet = command(thing_id, "create", value={"attributes": {"q": True}}, **{"response-required": False})
    assert await protocol.handle(quiet, DITTO, runtime) is None
    got = await run(runtime, command(thing_id, "retrieve", "/attributes/q"))
    assert got["value"] is True  # executed all the same
    failing = command(thing_id, "retrieve", "/attributes/missing", **{"response-required": "false"})
    assert await protocol.handle(failing, DITTO, runtime) is None
    # execute always answers (NATS ingestion needs the outcome)
    assert (await protocol.execute(failing, DITTO, runtime))["status"] == 404


async def test_not_readable_is_404_readable_not_writable_is_403(runtime: Runtime) -> None:
    hidden, readable = new_thing_id(), new_thing_id()
    await run(runtime, command(hidden, "create", value={"attributes": {"a": 1}}))
    policy = full_access("nginx:ditto")
    policy["entries"]["reader"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {"thing:/": {"grant": ["READ"], "revoke": []}},
    }
    await run(runtime, command(readable, "create", value={"attributes": {"a": 1}, "_policy": policy}))

    for action, path, value in [("retrieve", "/", ...), ("modify", "/attributes/a", 2), ("delete", "/", ...)]:
        response = await run(runtime, command(hidden, action, path, value), OTHER)
        assert_error(response, 404, "things:thing.notfound", errors_of(hidden))

    got = await run(runtime, command(readable, "retrieve", "/attributes/a"), OTHER)
    assert got["value"] == 1
    refused = await run(runtime, command(readable, "modify", "/attributes/a", 2), OTHER)
    assert_error(refused, 403, "things:attribute.notmodifiable", errors_of(readable))


@pytest.mark.parametrize(
    ("action", "path", "value", "status", "error"),
    [
        ("create", "/", [1, 2], 400, "things:thing.invalid"),
        ("create", "/attributes", {}, 400, "things:protocol.invalid"),
        ("modify", "/attributes", 5, 400, None),
        ("modify", "/attributes/a", ..., 400, "json.invalid"),
        ("modify", "/unknown/x", 1, 400, None),
        ("retrieve", "/attributes/nope", ..., 404, "things:attribute.notfound"),
    ],
)
async def test_invalid_commands_are_error_envelopes(
    runtime: Runtime, action: str, path: str, value: Any, status: int, error: str | None
) -> None:
    thing_id = new_thing_id()
    await run(runtime, command(thing_id, "create", value={"attributes": {"a": 1}}))
    response = await run(runtime, command(thing_id, action, path, value))
    assert response["status"] == status, response
    assert response["topic"] == errors_of(thing_id)
    if error is not None:
        assert response["value"]["error"] == error, response


@pytest.mark.parametrize(
    ("envelope", "status", "error", "errors_topic"),
    [
        ({"topic": "org.test/x/things/twin/commands/frobnicate", "path": "/"}, 400,
         protocol.UNKNOWN_TOPIC, "org.test/x/things/twin/errors"),
        ({"topic": "org.test/x/things/live/commands/retrieve", "path": "/"}, 400,
         protocol.UNKNOWN_TOPIC, "org.test/x/things/twin/errors"),
        ({"topic": "org.test/x/policies/commands/merge", "path": "/"}, 400,
         protocol.UNKNOWN_TOPIC, "org.test/x/policies/errors"),
        ({"topic": "garbage", "path": "/"}, 400, protocol.UNKNOWN_TOPIC, protocol.UNKNOWN_ERRORS_TOPIC),
        ({"path": "/"}, 400, "json.invalid", protocol.UNKNOWN_ERRORS_TOPIC),
        ([1, 2], 400, "json.invalid", protocol.UNKNOWN_ERRORS_TOPIC),
        ({"topic": "9bad/x/things/twin/commands/retrieve", "path": "/"}, 400,
         "things:id.invalid", "9bad/x/things/twin/errors"),
        ({"topic": "org.test/x/things/twin/commands/retrieve", "path": 5}, 400,
         "json.pointer.invalid", "org.test/x/things/twin/errors"),
        ({"topic": "org.test/x/things/twin/commands/retrieve", "headers": [], "path": "/"}, 400,
         "json.invalid", "org.test/x/things/twin/errors"),
        ({"topic": "org.test/x/things/twin/commands/retrieve", "path": "/",
          "headers": {"response-required": "maybe"}}, 400, "header.invalid", "org.test/x/things/twin/errors"),
    ],
)  # fmt: skip
async def test_malformed_envelopes(
    runtime: Runtime, envelope: Any, status: int, error: str, errors_topic: str
) -> None:
    response = await run(runtime, envelope)
    assert_error(response, status, error, errors_topic)
    assert response["headers"]["correlation-id"]


async def test_invalid_json_text(runtime: Runtime) -> None:
    response = await protocol.handle_text("{not json", DITTO, runtime)
    assert response is not None
    body = assert_error(response, 400, "json.invalid", protocol.UNKNOWN_ERRORS_TOPIC)
    assert "{not json" in body["message"]
    ok = await protocol.handle_text(b'{"topic": "org.test/x/things/twin/commands/retrieve"}', DITTO, runtime)
    assert ok is not None and ok["status"] == 404


async def test_retrieve_several_things(runtime: Runtime) -> None:
    a, b, hidden = new_thing_id(), new_thing_id(), new_thing_id()
    for thing_id in (a, b):
        await run(runtime, command(thing_id, "create", value={"attributes": {"id": thing_id}}))
    await run(runtime, command(hidden, "create", value={}), OTHER)
    envelope = {
        "topic": "_/_/things/twin/commands/retrieve",
        "headers": {"correlation-id": "many"},
        "path": "/",
        "value": {"thingIds": [b, hidden, "org.test:absent", a]},
    }
    response = await run(runtime, envelope)
    assert response["status"] == 200 and response["topic"] == "_/_/things/twin/commands/retrieve"
    assert [t["thingId"] for t in response["value"]] == [b, a]
    bad = await run(runtime, {**envelope, "value": {"thingIds": "x"}})
    assert_error(bad, 400, "json.invalid", "_/_/things/twin/errors")


async def test_policy_commands(runtime: Runtime) -> None:
    policy_id = new_thing_id("org.policy")
    errors = f"{policy_id.replace(':', '/')}/policies/errors"

    def p(action: str, path: str = "/", value: Any = ..., **headers: Any) -> dict[str, Any]:
        return command(policy_id, action, path, value, group="policies", **headers)

    created = await run(runtime, p("create", value=full_access("nginx:ditto")))
    assert created["status"] == 201 and created["topic"] == topic(policy_id, "create", "policies")
    assert created["value"]["entries"]["owner"]["subjects"] == {"nginx:ditto": {"type": "test"}}
    assert_error(await run(runtime, p("create", value=full_access("nginx:ditto"))), 409,
                 "policies:policy.conflict", errors)  # fmt: skip

    got = await run(runtime, p("retrieve"))
    assert got["status"] == 200 and got["value"]["policyId"] == policy_id

    entry = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/attributes": {"grant": ["READ"], "revoke": []},
            "policy:/entries/readers": {"grant": ["READ"], "revoke": []},
        },
    }
    assert (await run(runtime, p("modify", "/entries/readers", entry)))["status"] == 201
    subject = await run(runtime, p("modify", "/entries/readers/subjects/nginx:third", {"type": "x"}))
    assert subject["status"] == 201 and subject["value"] == {"type": "x"}
    rights = {"grant": ["READ"], "revoke": ["WRITE"]}
    slashed = await run(runtime, p("modify", "/entries/readers/resources/thing:/features/f", rights))
    assert slashed["status"] == 201 and slashed["path"] == "/entries/readers/resources/thing:/features/f"
    escaped = await run(runtime, p("retrieve", "/entries/readers/resources/thing:~1features~1f"))
    assert escaped["status"] == 200 and escaped["value"] == rights
    got = await run(runtime, p("retrieve", "/entries/readers/subjects"))
    assert set(got["value"]) == {"nginx:other", "nginx:third"}

    assert (await run(runtime, p("delete", "/entries/readers/subjects/nginx:third")))["status"] == 204
    assert (await run(runtime, p("modify", "/entries/readers", entry)))["status"] == 204
    assert_error(await run(runtime, p("delete", "/entries/readers"), OTHER), 403,
                 "policies:entry.notmodifiable", errors)  # fmt: skip
    assert (await run(runtime, p("delete", "/entries/readers")))["status"] == 204
    assert_error(
        await run(runtime, p("retrieve", "/entries/readers")), 404, "policies:entry.notfound", errors
    )

    lockout = await run(runtime, p("delete", "/entries/owner"))
    assert_error(lockout, 403, "policies:entry.modificationinvalid", errors)
    assert_error(await run(runtime, p("retrieve", "/entries/owner/resources/nokey")), 400,
                 "policies:entry.invalid", errors)  # fmt: skip
    assert_error(await run(runtime, p("create", "/entries", {})), 400, "policies:protocol.invalid", errors)

    assert (await run(runtime, p("delete")))["status"] == 204
    assert_error(await run(runtime, p("retrieve")), 404, "policies:policy.notfound", errors)


async def test_a_thing_created_with_an_existing_policy(runtime: Runtime, thing_id: str) -> None:
    policy_id = new_thing_id("org.policy")
    created = await run(
        runtime, command(policy_id, "create", value=full_access("nginx:ditto"), group="policies")
    )
    assert created["status"] == 201
    thing = await run(runtime, command(thing_id, "create", value={"policyId": policy_id}))
    assert thing["status"] == 201 and thing["value"]["policyId"] == policy_id


async def test_condition_header_on_commands(runtime: Runtime) -> None:
    thing_id = new_thing_id()
    assert (await run(runtime, command(thing_id, "create", value={"attributes": {"n": 1}})))["status"] == 201
    r = await run(runtime, command(thing_id, "modify", "/attributes/n", 2, condition="gt(attributes/n,1)"))
    assert_error(r, 412, "things:condition.failed", errors_of(thing_id))
    r = await run(runtime, command(thing_id, "modify", "/attributes/n", 2, condition="eq(attributes/n,1)"))
    assert r["status"] == 204, r
    r = await run(runtime, command(thing_id, "retrieve", "/attributes/n", condition="eq(attributes/n,1)"))
    assert_error(r, 412, "things:condition.failed", errors_of(thing_id))
    r = await run(runtime, command(thing_id, "retrieve", "/attributes/n", condition="eq(attributes/n"))
    assert_error(r, 400, "things:condition.invalid", errors_of(thing_id))
