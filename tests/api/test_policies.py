"""The policy API end to end: CRUD of every policy resource, preconditions, validation, the
journal rows of policies, and the lock-out rule (real PostgreSQL and NATS)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from litestar import Litestar

from tests.api.helpers import assert_error, full_access
from tests.conftest import verify_chain
from twinstore.runtime import Runtime

OTHER = ("other", "secret")
RW = {"grant": ["READ", "WRITE"], "revoke": []}

SELECT_POLICY_JOURNAL = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash
FROM journal WHERE entity = 'policy' AND id = $1 ORDER BY revision
"""


@pytest_asyncio.fixture(loop_scope="session")
async def other(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=OTHER) as c:
        yield c


@pytest.fixture
def policy_id() -> str:
    return f"org.test.policy:{secrets.token_hex(6)}"


def purl(policy_id: str, path: str = "") -> str:
    return f"/api/2/policies/{policy_id}{path}"


def entry(*subjects: str, **resources: dict[str, Any]) -> dict[str, Any]:
    """An entry; resources given as keyword ``thing=...`` are keyed ``thing:/``."""
    return {
        "subjects": {s: {"type": "test"} for s in subjects},
        "resources": {f"{k}:/": v for k, v in resources.items()},
    }


async def put_policy(client: httpx.AsyncClient, policy_id: str, doc: dict[str, Any]) -> httpx.Response:
    r = await client.put(purl(policy_id), json=doc)
    assert r.status_code in (201, 204), r.text
    return r


async def etag_of(client: httpx.AsyncClient, policy_id: str) -> str:
    r = await client.get(purl(policy_id))
    assert r.status_code == 200, r.text
    return r.headers["etag"]


async def journal(runtime: Runtime, policy_id: str) -> list[Any]:
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        return list(await con.fetch(SELECT_POLICY_JOURNAL, policy_id))


# ---- CRUD of the whole policy ------------------------------------------------------------


async def test_put_creates_policy_with_body_location_and_etag(
    client: httpx.AsyncClient, policy_id: str
) -> None:
    doc = full_access("nginx:ditto")
    r = await client.put(purl(policy_id), json=doc)
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:1"'
    assert r.headers["location"] == f"http://twinstore{purl(policy_id)}"
    created = r.json()
    assert created["policyId"] == policy_id
    assert created["entries"] == doc["entries"]


async def test_get_policy_puts_policy_id_first(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.get(purl(policy_id))
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"rev:1"'
    assert r.text.startswith('{"policyId":'), r.text
    assert r.json() == {"policyId": policy_id, **full_access("nginx:ditto")}


async def test_put_replaces_policy_with_204_and_next_revision(
    client: httpx.AsyncClient, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    replaced = full_access("nginx:ditto", "nginx:other")
    r = await client.put(purl(policy_id), json=replaced)
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["etag"] == '"rev:2"'
    assert (await client.get(purl(policy_id))).json()["entries"] == replaced["entries"]


async def test_delete_policy_then_not_found(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.delete(purl(policy_id))
    assert r.status_code == 204, r.text
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
    assert_error(await client.delete(purl(policy_id)), 404, "policies:policy.notfound")
    assert_error(await client.get(purl(policy_id, "/entries")), 404, "policies:policy.notfound")


async def test_unknown_policy_is_not_found(client: httpx.AsyncClient, policy_id: str) -> None:
    body = assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
    assert policy_id in body["message"]
    r = await client.put(purl(policy_id, "/entries/x"), json=entry("nginx:ditto", thing=RW))
    assert_error(r, 404, "policies:policy.notfound")


async def test_policy_id_in_body_is_ignored(client: httpx.AsyncClient, policy_id: str) -> None:
    r = await client.put(
        purl(policy_id), json={"policyId": "org.test:elsewhere", **full_access("nginx:ditto")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["policyId"] == policy_id
    assert (await client.get(purl(policy_id))).json()["policyId"] == policy_id
    assert_error(await client.get(purl("org.test:elsewhere")), 404, "policies:policy.notfound")


async def test_invalid_policy_id_is_400(client: httpx.AsyncClient) -> None:
    assert_error(
        await client.put(purl("no-namespace"), json=full_access("nginx:ditto")), 400, "policies:id.invalid"
    )


# ---- entries, subjects, resources --------------------------------------------------------


async def test_entries_crud(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.get(purl(policy_id, "/entries"))
    assert r.status_code == 200, r.text
    assert r.json() == full_access("nginx:ditto")["entries"]

    reader = entry("nginx:other", thing={"grant": ["READ"], "revoke": []})
    r = await client.put(purl(policy_id, "/entries/reader"), json=reader)
    assert r.status_code == 201, r.text
    assert r.json() == reader
    assert r.headers["location"].endswith(purl(policy_id, "/entries/reader"))
    assert r.headers["etag"].startswith('"hash:')  # sub-resources: value-based, as Ditto
    assert await etag_of(client, policy_id) == '"rev:2"'
    assert (await client.get(purl(policy_id, "/entries/reader"))).json() == reader

    reader["resources"]["thing:/"]["grant"] = ["READ", "WRITE"]
    r = await client.put(purl(policy_id, "/entries/reader"), json=reader)
    assert r.status_code == 204, r.text
    assert await etag_of(client, policy_id) == '"rev:3"'
    assert (await client.get(purl(policy_id, "/entries/reader"))).json() == reader

    r = await client.delete(purl(policy_id, "/entries/reader"))
    assert r.status_code == 204, r.text
    assert_error(await client.get(purl(policy_id, "/entries/reader")), 404, "policies:entry.notfound")
    assert_error(await client.delete(purl(policy_id, "/entries/reader")), 404, "policies:entry.notfound")
    assert await etag_of(client, policy_id) == '"rev:4"'


async def test_replacing_all_entries(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    entries = {"a": entry("nginx:ditto", thing=RW, policy=RW), "b": entry("nginx:other", thing=RW)}
    r = await client.put(purl(policy_id, "/entries"), json=entries)
    assert r.status_code == 204, r.text
    assert (await client.get(purl(policy_id, "/entries"))).json() == entries


async def test_subjects_crud(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    base = "/entries/owner/subjects"
    r = await client.get(purl(policy_id, base))
    assert r.status_code == 200, r.text
    assert r.json() == {"nginx:ditto": {"type": "test"}}

    r = await client.put(purl(policy_id, base + "/nginx:other"), json={"type": "colleague"})
    assert r.status_code == 201, r.text
    assert r.json() == {"type": "colleague"}
    r = await client.get(purl(policy_id, base + "/nginx:other"))
    assert r.status_code == 200, r.text
    assert r.json() == {"type": "colleague"}
    r = await client.put(purl(policy_id, base + "/nginx:other"), json={"type": "friend"})
    assert r.status_code == 204, r.text

    r = await client.put(purl(policy_id, base), json={"nginx:ditto": {"type": "me"}, "idp:x": {"type": "y"}})
    assert r.status_code == 204, r.text
    assert (await client.get(purl(policy_id, base))).json() == {
        "nginx:ditto": {"type": "me"},
        "idp:x": {"type": "y"},
    }
    r = await client.delete(purl(policy_id, base + "/idp:x"))
    assert r.status_code == 204, r.text
    assert_error(await client.get(purl(policy_id, base + "/idp:x")), 404, "policies:subject.notfound")
    assert_error(await client.delete(purl(policy_id, base + "/idp:x")), 404, "policies:subject.notfound")
    assert_error(
        await client.get(purl(policy_id, "/entries/nope/subjects/idp:x")), 404, "policies:entry.notfound"
    )


async def test_resources_raw_and_percent_encoded(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    base = "/entries/owner/resources"
    rights = {"grant": ["READ"], "revoke": ["WRITE"]}
    r = await client.put(purl(policy_id, base + "/thing:/features/f"), json=rights)
    assert r.status_code == 201, r.text
    assert r.json() == rights
    for key in ("thing:/features/f", "thing%3A%2Ffeatures%2Ff", "thing:%2Ffeatures%2Ff"):
        r = await client.get(purl(policy_id, f"{base}/{key}"))
        assert r.status_code == 200, (key, r.text)
        assert r.json() == rights
    assert (await client.get(purl(policy_id, base))).json()["thing:/features/f"] == rights

    r = await client.put(purl(policy_id, base + "/thing%3A%2Ffeatures%2Ff"), json=RW)
    assert r.status_code == 204, r.text
    assert (await client.get(purl(policy_id, base + "/thing:/features/f"))).json() == RW

    r = await client.delete(purl(policy_id, base + "/thing%3A%2Ffeatures%2Ff"))
    assert r.status_code == 204, r.text
    r = await client.get(purl(policy_id, base + "/thing:/features/f"))
    assert_error(r, 404, "policies:resource.notfound")
    r = await client.delete(purl(policy_id, base + "/thing:/features/f"))
    assert_error(r, 404, "policies:resource.notfound")
    assert_error(
        await client.get(purl(policy_id, "/entries/nope/resources/thing:/")), 404, "policies:entry.notfound"
    )
    assert sorted((await client.get(purl(policy_id, base))).json()) == ["message:/", "policy:/", "thing:/"]


async def test_resource_keys_beside_an_entry_labelled_resources(
    client: httpx.AsyncClient, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.put(purl(policy_id, "/entries/resources"), json=entry("idp:x", thing=RW))
    assert r.status_code == 201, r.text
    r = await client.put(purl(policy_id, "/entries/resources/resources/thing:/resources/x"), json=RW)
    assert r.status_code == 201, r.text
    r = await client.get(purl(policy_id, "/entries/resources/resources/thing%3A%2Fresources%2Fx"))
    assert r.status_code == 200, r.text
    assert r.json() == RW
    assert sorted((await client.get(purl(policy_id, "/entries/resources/resources"))).json()) == [
        "thing:/",
        "thing:/resources/x",
    ]
    r = await client.put(purl(policy_id, "/entries/owner/resources/thing:/attributes/resources/y"), json=RW)
    assert r.status_code == 201, r.text
    assert (
        "thing:/attributes/resources/y"
        in (await client.get(purl(policy_id, "/entries/owner/resources"))).json()
    )


async def test_bad_resource_key_in_path_is_400(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.put(purl(policy_id, "/entries/owner/resources/things:/x"), json=RW)
    assert_error(r, 400, "policies:entry.invalid")
    r = await client.put(purl(policy_id, "/entries/owner/resources/thing"), json=RW)
    assert_error(r, 400, "policies:entry.invalid")
    assert await etag_of(client, policy_id) == '"rev:1"'


async def test_revision_increases_by_one_per_write(client: httpx.AsyncClient, policy_id: str) -> None:
    writes = [
        ("PUT", "", full_access("nginx:ditto")),
        ("PUT", "/entries/e", entry("nginx:other", thing=RW)),
        ("PUT", "/entries/e/subjects/idp:a", {"type": "t"}),
        ("PUT", "/entries/e/resources/thing:/attributes", RW),
        ("DELETE", "/entries/e/resources/thing:/attributes", None),
        ("DELETE", "/entries/e/subjects/idp:a", None),
        ("DELETE", "/entries/e", None),
        ("PUT", "", full_access("nginx:ditto")),
    ]
    for expected, (method, path, doc) in enumerate(writes, start=1):
        content = None if doc is None else orjson.dumps(doc)
        headers = {} if doc is None else {"content-type": "application/json"}
        r = await client.request(method, purl(policy_id, path), content=content, headers=headers)
        assert r.status_code in (201, 204), (method, path, r.text)
        assert await etag_of(client, policy_id) == f'"rev:{expected}"'


# ---- preconditions -----------------------------------------------------------------------


async def test_if_match_and_if_none_match(client: httpx.AsyncClient, policy_id: str) -> None:
    doc = full_access("nginx:ditto")
    r = await client.put(purl(policy_id), json=doc, headers={"if-match": "*"})
    assert_error(r, 412, "things:precondition.failed")
    r = await client.put(purl(policy_id), json=doc, headers={"if-none-match": "*"})
    assert r.status_code == 201, r.text
    r = await client.put(purl(policy_id), json=doc, headers={"if-none-match": "*"})
    assert_error(r, 412, "things:precondition.failed")
    r = await client.put(purl(policy_id), json=doc, headers={"if-match": '"rev:7"'})
    assert_error(r, 412, "things:precondition.failed")
    r = await client.put(purl(policy_id), json=doc, headers={"if-match": '"rev:1"'})
    assert r.status_code == 204, r.text

    r = await client.get(purl(policy_id), headers={"if-none-match": '"rev:2"'})
    assert r.status_code == 304, r.text
    assert r.headers["etag"] == '"rev:2"'
    r = await client.get(purl(policy_id), headers={"if-match": '"rev:1"'})
    assert_error(r, 412, "things:precondition.failed")
    r = await client.get(purl(policy_id), headers={"if-match": '"rev:2"'})
    assert r.status_code == 200, r.text
    r = await client.delete(purl(policy_id, "/entries/owner"), headers={"if-match": '"rev:1"'})
    assert_error(r, 412, "things:precondition.failed")
    assert await etag_of(client, policy_id) == '"rev:2"'


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (
            {"entries": {"e": entry("nginx:ditto", thing={"grant": ["READ", "FLY"]})}},
            "policies:entry.invalid",
        ),
        (
            {"entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": {"thing": RW}}}},
            "policies:entry.invalid",
        ),
        (
            {"entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": {"thing:attributes": RW}}}},
            "policies:entry.invalid",
        ),
        (
            {"entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": {"car:/": RW}}}},
            "policies:entry.invalid",
        ),
        ({"entries": {"e": entry("ditto", thing=RW)}}, "policies:subjectid.invalid"),
        (
            {"entries": {"e": {"subjects": {"nginx:ditto": {"expiry": "tomorrow"}}, "resources": {}}}},
            "policies:subjectexpiry.invalid",
        ),
        ({"entries": {"e": {"subjects": {}}}}, "json.field.missing"),
        ({"entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": []}}}, "json.invalid"),
        ({}, "json.field.missing"),
        ({"entries": []}, "json.invalid"),
    ],
    ids=[
        "unknown-permission",
        "resource-without-type",
        "resource-without-slash",
        "unknown-resource-type",
        "subject-without-issuer",
        "bad-expiry",
        "entry-without-resources",
        "resources-not-object",
        "no-entries",
        "entries-not-object",
    ],
)
async def test_invalid_policy_is_400(client: httpx.AsyncClient, policy_id: str, doc: Any, error: str) -> None:
    assert_error(await client.put(purl(policy_id), json=doc), 400, error)
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")


async def test_invalid_entry_edit_is_400_and_changes_nothing(
    client: httpx.AsyncClient, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.put(purl(policy_id, "/entries/owner/resources/thing:/"), json={"grant": ["ALL"]})
    assert_error(r, 400, "policies:entry.invalid")
    r = await client.put(purl(policy_id, "/entries/owner/subjects/nobody"), json={})
    assert_error(r, 400, "policies:subjectid.invalid")
    r = await client.put(purl(policy_id, "/entries/bad"), json={"subjects": {}})
    assert_error(r, 400, "json.field.missing")
    r = await client.put(purl(policy_id), content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "json.invalid")
    assert await etag_of(client, policy_id) == '"rev:1"'


# ---- the journal -------------------------------------------------------------------------


async def test_policy_writes_are_journaled_with_a_hash_chain(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto", "nginx:other"))
    r = await other.put(
        purl(policy_id, "/entries/extra"),
        json=entry("idp:x", thing=RW),
        headers={"correlation-id": "policy-journal-1"},
    )
    assert r.status_code == 201, r.text
    assert (await client.delete(purl(policy_id, "/entries/extra/subjects/idp:x"))).status_code == 204
    assert (await client.delete(purl(policy_id, "/entries/extra"))).status_code == 204
    assert (await client.delete(purl(policy_id))).status_code == 204
    await put_policy(client, policy_id, full_access("nginx:ditto"))

    rows = await journal(runtime, policy_id)
    verify_chain(rows)
    assert [r["entity"] for r in rows] == ["policy"] * 6
    assert [(r["action"], r["path"]) for r in rows] == [
        ("created", "/"),
        ("created", "/entries/extra"),
        ("deleted", "/entries/extra/subjects/idp:x"),
        ("deleted", "/entries/extra"),
        ("deleted", "/"),
        ("created", "/"),
    ]
    assert [r["originator"] for r in rows] == ["nginx:ditto", "nginx:other"] + ["nginx:ditto"] * 4
    assert rows[1]["correlation_id"] == "policy-journal-1"
    assert orjson.loads(rows[1]["value"]) == entry("idp:x", thing=RW)
    assert orjson.loads(rows[0]["value"])["policyId"] == policy_id


async def test_refused_writes_leave_no_journal_rows(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    assert_error(
        await other.put(purl(policy_id), json=full_access("nginx:other")), 404, "policies:policy.notfound"
    )
    assert_error(await client.put(purl(policy_id), json={"entries": 1}), 400, "json.invalid")
    assert_error(
        await client.delete(purl(policy_id, "/entries/owner")), 403, "policies:entry.modificationinvalid"
    )
    rows = await journal(runtime, policy_id)
    assert [r["revision"] for r in rows] == [1]


# ---- who may read and write a policy -----------------------------------------------------


async def test_other_subject_cannot_see_or_change_a_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    assert_error(await other.get(purl(policy_id)), 404, "policies:policy.notfound")
    assert_error(await other.get(purl(policy_id, "/entries/owner")), 404, "policies:policy.notfound")
    assert_error(await other.delete(purl(policy_id)), 404, "policies:policy.notfound")
    r = await other.put(purl(policy_id, "/entries/mine"), json=entry("nginx:other", policy=RW))
    assert_error(r, 404, "policies:policy.notfound")
    assert await etag_of(client, policy_id) == '"rev:1"'


async def test_read_only_on_policy_is_403_on_writes_and_filtered_on_reads(
    client: httpx.AsyncClient, other: httpx.AsyncClient, policy_id: str
) -> None:
    doc = full_access("nginx:ditto")
    doc["entries"]["reader"] = entry("nginx:other", policy={"grant": ["READ"], "revoke": []})
    doc["entries"]["reader"]["resources"]["policy:/entries/owner"] = {"grant": [], "revoke": ["READ"]}
    await put_policy(client, policy_id, doc)
    r = await other.get(purl(policy_id))
    assert r.status_code == 200, r.text
    assert r.json() == {"policyId": policy_id, "entries": {"reader": doc["entries"]["reader"]}}
    assert_error(await other.get(purl(policy_id, "/entries/owner")), 404, "policies:entry.notfound")
    r = await other.put(purl(policy_id, "/entries/reader"), json=entry("nginx:other", policy=RW))
    assert_error(r, 403, "policies:entry.notmodifiable")
    assert_error(await other.delete(purl(policy_id)), 403, "policies:policy.notmodifiable")
    r = await other.put(purl(policy_id, "/entries/reader/subjects/nginx:x"), json={})
    assert_error(r, 403, "policies:subject.notmodifiable")
    assert await etag_of(client, policy_id) == '"rev:1"'


# ---- lock-out ----------------------------------------------------------------------------


async def test_removing_own_write_on_policy_is_refused(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    read_only = entry("nginx:ditto", thing=RW, policy={"grant": ["READ"], "revoke": []})
    r = await client.put(purl(policy_id, "/entries/owner"), json=read_only)
    assert_error(r, 403, "policies:entry.modificationinvalid")
    assert_error(
        await client.delete(purl(policy_id, "/entries/owner")), 403, "policies:entry.modificationinvalid"
    )
    r = await client.delete(purl(policy_id, "/entries/owner/subjects/nginx:ditto"))
    assert_error(r, 403, "policies:entry.modificationinvalid")
    r = await client.put(purl(policy_id, "/entries/owner/resources/policy:/"), json={"grant": ["READ"]})
    assert_error(r, 403, "policies:entry.modificationinvalid")
    r = await client.put(purl(policy_id), json=full_access("nginx:other"))
    assert_error(r, 403, "policies:policy.modificationinvalid")
    r = await client.put(purl(policy_id, "/entries"), json={"x": entry("nginx:other", policy=RW)})
    assert_error(r, 403, "policies:policy.modificationinvalid")
    assert await etag_of(client, policy_id) == '"rev:1"'


async def test_lockout_allowed_by_header_keeps_read(client: httpx.AsyncClient, policy_id: str) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    read_only = entry("nginx:ditto", thing=RW, policy={"grant": ["READ"], "revoke": []})
    r = await client.put(
        purl(policy_id, "/entries/owner"), json=read_only, headers={"allow-policy-lockout": "true"}
    )
    assert r.status_code == 204, r.text
    r = await client.get(purl(policy_id))
    assert r.status_code == 200, r.text
    assert r.json()["entries"]["owner"] == read_only
    r = await client.put(purl(policy_id, "/entries/owner"), json=entry("nginx:ditto", policy=RW))
    assert_error(r, 403, "policies:entry.notmodifiable")


async def test_lockout_allowed_by_query_parameter_hides_policy(
    client: httpx.AsyncClient, policy_id: str
) -> None:
    await put_policy(client, policy_id, full_access("nginx:ditto"))
    r = await client.put(
        purl(policy_id), params={"allow-policy-lockout": "true"}, json=full_access("nginx:other")
    )
    assert r.status_code == 204, r.text
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
    assert_error(
        await client.put(purl(policy_id), json=full_access("nginx:ditto")), 404, "policies:policy.notfound"
    )


async def test_creating_policy_without_own_write_needs_lockout(
    client: httpx.AsyncClient, other: httpx.AsyncClient, policy_id: str
) -> None:
    assert_error(
        await client.put(purl(policy_id), json=full_access("nginx:other")),
        403,
        "policies:policy.modificationinvalid",
    )
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
    r = await client.put(
        purl(policy_id), json=full_access("nginx:other"), headers={"allow-policy-lockout": "true"}
    )
    assert r.status_code == 201, r.text
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
    r = await other.get(purl(policy_id))
    assert r.status_code == 200, r.text
    assert r.json()["entries"] == full_access("nginx:other")["entries"]


async def test_bad_lockout_header_is_400(client: httpx.AsyncClient, policy_id: str) -> None:
    r = await client.put(
        purl(policy_id), json=full_access("nginx:ditto"), headers={"allow-policy-lockout": "maybe"}
    )
    assert_error(r, 400, "header.invalid")
    assert_error(await client.get(purl(policy_id)), 404, "policies:policy.notfound")
