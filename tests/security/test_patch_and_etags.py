"""Attacks (issue 15, items 1, 3 and 7) against a real server: RFC 6902 patches that read hidden
paths, entity tags computed over hidden values, and patches that amplify a thing's size.

The thing belongs to ``ditto``; ``eve`` may READ and WRITE ``thing:/features/public`` only,
except ``/features/public/properties/hidden``, which she may WRITE but not READ. The feature
``secret`` holds the value 42 that eve must not learn, by any reply, error text or tag.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.api.helpers import assert_error
from twinstore.model.etag import etag_of

PATCH = {"content-type": "application/json-patch+json"}
SECRET = 42
HIDDEN = 4242
WRITE_OP = {"op": "add", "path": "/features/public/properties/t", "value": 1}


def _policy() -> dict[str, Any]:
    return {
        "entries": {
            "owner": {
                "subjects": {"nginx:ditto": {"type": "test"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                },
            },
            "eve": {
                "subjects": {"nginx:eve": {"type": "test"}},
                "resources": {
                    "thing:/features/public": {"grant": ["READ", "WRITE"], "revoke": []},
                    "thing:/features/public/properties/hidden": {"grant": [], "revoke": ["READ"]},
                },
            },
        }
    }


async def _thing(live: dict[str, Any], secret: Any = SECRET, hidden: Any = HIDDEN) -> str:
    thing_id = f"sec.patch:{uuid.uuid4().hex[:12]}"
    body = {
        "_policy": _policy(),
        "attributes": {"owner": "ditto"},
        "features": {
            "public": {"properties": {"a": 1, "hidden": hidden}},
            "secret": {"properties": {"x": secret}},
        },
    }
    r = await live["ditto"].put(f"/api/2/things/{thing_id}", json=body)
    assert r.status_code == 201, r.text
    return thing_id


def _no_values(body: dict[str, Any], *values: Any) -> None:
    text = " ".join(str(body.get(k, "")) for k in ("message", "description", "error"))
    for value in values:
        assert str(value) not in text, body
    assert "<class" not in text and "Traceback" not in text, body


def _shape(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The error with the location the caller named replaced: what must not differ."""
    return {k: (v.replace(path, "<path>") if isinstance(v, str) else v) for k, v in body.items()}


async def _patch(client: httpx.AsyncClient, thing_id: str, ops: Any) -> httpx.Response:
    return await client.patch(f"/api/2/things/{thing_id}", json=ops, headers=PATCH)


# ---- item 1: copy / move / test read only what the caller may read ---------------------


@pytest.mark.parametrize(
    ("hidden", "absent"),
    [
        # a feature eve may not read at all, and a property she may write but not read
        ("/features/secret/properties/x", "/features/absent/properties/x"),
        ("/features/public/properties/hidden", "/features/public/properties/nothere"),
    ],
)
async def test_copy_from_a_hidden_path_fails_as_from_a_missing_one(
    live: dict[str, Any], hidden: str, absent: str
) -> None:
    thing_id = await _thing(live)
    eve = live["eve"]
    got = []
    for source in (hidden, absent):
        op = {"op": "copy", "from": source, "path": "/features/public/properties/leak"}
        r = await _patch(eve, thing_id, [op])
        body = assert_error(r, 400, "things:patch.invalid")
        _no_values(body, SECRET, HIDDEN)
        got.append(_shape(body, source))
    assert got[0] == got[1]
    assert "Operation 0" in got[0]["message"]
    r = await eve.get(f"/api/2/things/{thing_id}/features/public/properties")
    assert r.status_code == 200 and r.json() == {"a": 1}, r.text
    # ditto (who may read everything) copies as before
    op = {"op": "copy", "from": "/features/secret/properties/x", "path": "/features/public/properties/c"}
    assert (await _patch(live["ditto"], thing_id, [op])).status_code == 204


async def test_move_from_a_hidden_path_fails_as_from_a_missing_one(live: dict[str, Any]) -> None:
    thing_id = await _thing(live)
    eve = live["eve"]
    # eve may WRITE but not READ 'hidden': moving it where she can read it is refused as a miss
    got = []
    for source in ("/features/public/properties/hidden", "/features/public/properties/nothere"):
        op = {"op": "move", "from": source, "path": "/features/public/properties/leak"}
        body = assert_error(await _patch(eve, thing_id, [op]), 400, "things:patch.invalid")
        _no_values(body, HIDDEN)
        got.append(_shape(body, source))
    assert got[0] == got[1]
    # a feature she may not write at all: 403, whether the path exists or not
    got = []
    for source in ("/features/secret/properties/x", "/features/secret/properties/y"):
        op = {"op": "move", "from": source, "path": "/features/public/properties/leak"}
        r = await _patch(eve, thing_id, [op])
        body = assert_error(r, 403, "things:thing.notmodifiable")
        got.append(body["error"])
    assert got[0] == got[1]
    r = await live["ditto"].get(f"/api/2/things/{thing_id}/features")
    assert r.json()["public"]["properties"] == {"a": 1, "hidden": HIDDEN}
    assert r.json()["secret"]["properties"] == {"x": SECRET}


async def test_test_op_on_a_hidden_path_is_no_oracle(live: dict[str, Any]) -> None:
    thing_id = await _thing(live)
    eve = live["eve"]
    answers = []
    for path, guess in [
        ("/features/secret/properties/x", SECRET),  # right guess
        ("/features/secret/properties/x", SECRET + 1),  # wrong guess
        ("/features/public/properties/hidden", HIDDEN),
        ("/features/public/properties/hidden", HIDDEN + 1),
    ]:
        # (with a write eve may make: a patch of tests alone needs WRITE where it is sent)
        r = await _patch(eve, thing_id, [{"op": "test", "path": path, "value": guess}, WRITE_OP])
        body = assert_error(r, 400, "things:patch.invalid")
        _no_values(body, SECRET, HIDDEN)
        answers.append((r.status_code, _shape(body, path)))
    assert answers[0] == answers[1] and answers[2] == answers[3]
    # ... and a truly missing path answers the same
    missing = "/features/secret/properties/y"
    r = await _patch(eve, thing_id, [{"op": "test", "path": missing, "value": 1}, WRITE_OP])
    assert (r.status_code, _shape(r.json(), missing)) == answers[0]


async def test_errors_of_readable_paths_hold_no_values(live: dict[str, Any]) -> None:
    thing_id = await _thing(live, secret=1717)
    ditto = live["ditto"]
    op = {"op": "test", "path": "/features/secret/properties/x", "value": 1818}
    r = await _patch(ditto, thing_id, [op])
    body = assert_error(r, 400, "things:patch.invalid")
    _no_values(body, 1717, 1818)
    assert "Operation 0 ('test')" in body["message"] and "/features/secret/properties/x" in body["message"]
    r = await _patch(
        ditto,
        thing_id,
        [
            {"op": "test", "path": "/features/secret/properties/x", "value": 1717},
            {"op": "replace", "path": "/attributes/nothere", "value": 1919},
        ],
    )
    body = assert_error(r, 400, "things:patch.invalid")
    _no_values(body, 1717, 1919)
    assert "Operation 1 ('replace')" in body["message"]
    for bad in ([{"op": "add"}], [{"op": "copy", "from": 5, "path": "/a"}], [7], {"op": "add"}):
        body = assert_error(await _patch(ditto, thing_id, bad), 400, "things:patch.invalid")
        _no_values(body, "<class", "jsonpointer", "KeyError")


# ---- item 7: amplification ------------------------------------------------------------


async def test_copy_amplification_is_refused_early(live: dict[str, Any]) -> None:
    thing_id = await _thing(live)
    ditto = live["ditto"]
    r = await ditto.put(f"/api/2/things/{thing_id}/attributes", json={"pad": "p" * 1000})
    assert r.status_code == 204, r.text
    ops = [{"op": "copy", "from": "/attributes", "path": f"/attributes/c{n}"} for n in range(40)]
    attack = asyncio.create_task(_patch(ditto, thing_id, ops))
    started = time.monotonic()
    health = []
    while not health or not attack.done():  # (at least once, while or right after the attack)
        t0 = time.monotonic()
        h = await ditto.get("/health", timeout=5)
        health.append((h.status_code, time.monotonic() - t0))
        if time.monotonic() - started > 10:
            break
    r = await asyncio.wait_for(attack, 30)
    elapsed = time.monotonic() - started
    body = assert_error(r, 413, "things:thing.tooLarge")
    assert elapsed < 2, elapsed
    assert all(status == 200 and took < 1 for status, took in health), health
    # refused at the operation that crossed the limit, not after applying all 40
    assert "Operation 6 ('copy')" in body["message"], body
    r = await ditto.get(f"/api/2/things/{thing_id}/attributes")
    assert r.json() == {"pad": "p" * 1000}


async def test_growth_is_refused_at_the_op_that_crosses_the_limit(live: dict[str, Any]) -> None:
    """Also a test that the size is bounded during application (this one is cheap on old code)."""
    thing_id = await _thing(live)
    ditto = live["ditto"]
    r = await ditto.put(f"/api/2/things/{thing_id}/attributes", json={"pad": "p" * 1000})
    assert r.status_code == 204
    ops = [{"op": "copy", "from": "/attributes", "path": f"/attributes/c{n}"} for n in range(12)]
    body = assert_error(await _patch(ditto, thing_id, ops), 413, "things:thing.tooLarge")
    assert "Operation 6 ('copy')" in body["message"], body


async def test_too_many_operations(live: dict[str, Any]) -> None:
    thing_id = await _thing(live)
    ops = [{"op": "add", "path": f"/attributes/a{n}", "value": n} for n in range(101)]
    body = assert_error(await _patch(live["ditto"], thing_id, ops), 413, "things:thing.tooLarge")
    assert "101 operations" in body["message"] and "100" in body["message"]
    assert (await _patch(live["ditto"], thing_id, ops[:100])).status_code == 204


# ---- item 3: entity tags ----------------------------------------------------------------


async def test_tags_are_computed_over_what_the_caller_receives(live: dict[str, Any]) -> None:
    one = await _thing(live, secret=SECRET)
    two = await _thing(live, secret=SECRET + 1)
    eve, ditto = live["eve"], live["ditto"]
    tags = {}
    for name, client in (("eve", eve), ("ditto", ditto)):
        for thing_id in (one, two):
            r = await client.get(f"/api/2/things/{thing_id}/features")
            assert r.status_code == 200, r.text
            tags[name, thing_id] = r.headers["etag"]
            if name == "eve":
                assert r.json() == {"public": {"properties": {"a": 1}}}
    # eve's tags do not depend on the hidden values; ditto's tags are Ditto's (whole value)
    assert tags["eve", one] == tags["eve", two]
    assert tags["ditto", one] != tags["ditto", two]
    assert tags["eve", one] != tags["ditto", one]
    r = await ditto.get(f"/api/2/things/{one}/features")
    assert tags["ditto", one] == etag_of(r.json(), 1, ["features"])
    # If-None-Match with the tag of the whole value (or a guess of it) is no 304 for eve ...
    for guess in (
        tags["ditto", one],
        etag_of(
            {"public": {"properties": {"a": 1, "hidden": HIDDEN}}, "secret": {"properties": {"x": SECRET}}},
            1,
            ["features"],
        ),
    ):
        r = await eve.get(f"/api/2/things/{one}/features", headers={"if-none-match": guess})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == tags["eve", one]
    # ... her own tag is
    r = await eve.get(f"/api/2/things/{one}/features", headers={"if-none-match": tags["eve", one]})
    assert r.status_code == 304
    # and If-Match with a guessed tag of a hidden value answers as any wrong tag would
    hidden_url = f"/api/2/things/{one}/features/public/properties/hidden"
    answers = []
    for guess in (etag_of(HIDDEN, 1, ["features", "public", "properties", "hidden"]), '"hash:0"'):
        r = await eve.put(hidden_url, json=1, headers={"if-match": guess})
        body = assert_error(r, 412, "things:precondition.failed")
        answers.append((body, r.headers.get("etag")))
    assert answers[0][0]["message"].replace(
        etag_of(HIDDEN, 1, ["features", "public", "properties", "hidden"]), "<tag>"
    ) == answers[1][0]["message"].replace('"hash:0"', "<tag>")
    assert answers[0][1] == answers[1][1]


async def test_write_tags_and_preconditions_see_only_the_readable_part(live: dict[str, Any]) -> None:
    one = await _thing(live, hidden=1)
    two = await _thing(live, hidden=2)
    eve = live["eve"]
    write_tags = []
    for thing_id in (one, two):
        r = await eve.get(f"/api/2/things/{thing_id}/features/public")
        mine = r.headers["etag"]
        # her tag holds as If-Match although a part she cannot read differs from what she got
        r = await eve.patch(
            f"/api/2/things/{thing_id}/features/public",
            json={"properties": {"a": 5}},
            headers={"content-type": "application/merge-patch+json", "if-match": mine},
        )
        assert r.status_code == 204, r.text
        write_tags.append(r.headers["etag"])
        r = await eve.get(f"/api/2/things/{thing_id}/features/public")
        assert r.headers["etag"] == write_tags[-1]
        assert r.json() == {"properties": {"a": 5}}
    assert write_tags[0] == write_tags[1]
    r = await live["ditto"].get(f"/api/2/things/{one}/features/public")
    assert r.json() == {"properties": {"a": 5, "hidden": 1}}
    assert r.headers["etag"] != write_tags[0]


async def test_historical_reads_tag_the_readable_part(live: dict[str, Any]) -> None:
    one = await _thing(live, secret=SECRET)
    two = await _thing(live, secret=SECRET + 1)
    tags = []
    for thing_id in (one, two):
        r = await live["eve"].get(
            f"/api/2/things/{thing_id}/features", headers={"at-historical-revision": "1"}
        )
        assert r.status_code == 200, r.text
        tags.append(r.headers["etag"])
    assert tags[0] == tags[1]


async def test_policy_tags_are_computed_over_what_the_caller_receives(live: dict[str, Any]) -> None:
    """The same for policies: eve may read only her own entry of the policy."""
    tags, write_tags = [], []
    for secret_subject in ("nginx:hidden-1", "nginx:hidden-2"):
        policy_id = f"sec.patch:{uuid.uuid4().hex[:12]}"
        doc = {
            "entries": {
                "owner": {
                    "subjects": {"nginx:ditto": {"type": "test"}},
                    "resources": {"policy:/": {"grant": ["READ", "WRITE"], "revoke": []}},
                },
                "eve": {
                    "subjects": {"nginx:eve": {"type": "test"}},
                    "resources": {"policy:/entries/eve": {"grant": ["READ", "WRITE"], "revoke": []}},
                },
                "other": {
                    "subjects": {secret_subject: {"type": "test"}},
                    "resources": {"thing:/": {"grant": ["READ"], "revoke": []}},
                },
            }
        }
        r = await live["ditto"].put(f"/api/2/policies/{policy_id}", json=doc)
        assert r.status_code == 201, r.text
        r = await live["eve"].get(f"/api/2/policies/{policy_id}/entries")
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"eve"}
        tags.append(r.headers["etag"])
        r = await live["eve"].get(f"/api/2/policies/{policy_id}/entries", headers={"if-none-match": tags[-1]})
        assert r.status_code == 304
        everything = (await live["ditto"].get(f"/api/2/policies/{policy_id}/entries")).json()
        r = await live["eve"].get(
            f"/api/2/policies/{policy_id}/entries",
            headers={"if-none-match": etag_of(everything, 1, ["entries"])},
        )
        assert r.status_code == 200
        # after a write of her own entry, still no trace of the hidden one
        r = await live["eve"].put(
            f"/api/2/policies/{policy_id}/entries/eve/subjects/nginx:eve2",
            json={"type": "test"},
            headers={"allow-policy-lockout": "true"},  # (eve has no WRITE on policy:/ anyway)
        )
        assert r.status_code == 201, r.text
        r = await live["eve"].get(f"/api/2/policies/{policy_id}/entries")
        write_tags.append(r.headers["etag"])
    assert tags[0] == tags[1]
    assert write_tags[0] == write_tags[1]
