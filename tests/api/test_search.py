"""GET|POST /api/2/search/things and /count end to end (real PostgreSQL and NATS): the RQL
operators, namespaces, fields, options and errors; results through random policies compared
with a brute-force reference (readable part of every thing, ``rql.matches``, ``rql.sort_key``);
cursors that stay stable while other things are created and deleted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import pytest_asyncio
from litestar import Litestar

import policies
from tests.api.helpers import assert_error, create, full_access, make_policy, url
from tests.conftest import bounded, eventually
from twinstore.enforcement import readable_thing
from twinstore.model import rql
from twinstore.model.thing import ThingState
from twinstore.runtime import Runtime

OTHER = ("other", "secret")
SEARCH = "/api/2/search/things"
COUNT = "/api/2/search/things/count"
FORM = {"content-type": "application/x-www-form-urlencoded"}
#: Well-formed cursors with values of the wrong type for sort(+thingId) (str, str expected).
CRAFTED: list[Any] = [
    ["+thingId", [1, 2]],
    ["+thingId", ["a", True]],
    ["+thingId", ["a", None]],
    ["+thingId", [{"n": "x"}, "a"]],
    ["+thingId", [{"t": "yesterday"}, "a"]],
    ["+thingId", ["a"]],
    ["+thingId", "ab"],
    ["+thingId", [["a"], "b"]],
    "x",
]


def b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest_asyncio.fixture(loop_scope="session")
async def other(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=OTHER) as c:
        yield c


def namespace() -> str:
    return f"org.search{secrets.token_hex(4)}"


async def search(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    r = await client.get(SEARCH, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    found: dict[str, Any] = r.json()
    # nextPageOffset only with limit(offset,count), and then never a cursor
    assert set(found) in ({"items"}, {"items", "cursor"}, {"items", "nextPageOffset"}), found
    assert isinstance(found["items"], list), found
    if "cursor" in found:
        assert isinstance(found["cursor"], str) and found["cursor"], found
    return found


async def ids(client: httpx.AsyncClient, **params: str) -> list[str]:
    return [item["thingId"] for item in (await search(client, **params))["items"]]


async def count(client: httpx.AsyncClient, **params: str) -> int:
    r = await client.get(COUNT, params=params)
    assert r.status_code == 200, r.text
    value = r.json()
    assert isinstance(value, int) and not isinstance(value, bool), r.text
    return value


async def walk(client: httpx.AsyncClient, size: int, **params: str) -> list[dict[str, Any]]:
    """Every page (``size(size)`` plus the given sort) following cursors; all items in order."""
    sort = params.pop("option", "")
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        option = ",".join(o for o in (sort, f"size({size})", f"cursor({cursor})" if cursor else "") if o)
        page = await search(client, option=option, **params)
        assert len(page["items"]) <= size
        items += page["items"]
        cursor = page.get("cursor")
        if cursor is None:
            return items
        assert len(page["items"]) == size, "a page with a cursor is full"
    raise AssertionError("too many pages")


# ---- API basics --------------------------------------------------------------------------

BASIC: dict[str, dict[str, Any]] = {
    "a": {
        "attributes": {"n": 1, "s": "alpha", "tags": ["x", "y"], "flag": True},
        "features": {"f": {"properties": {"t": 20}}},
    },
    "b": {"attributes": {"n": 2, "s": "beta", "tags": ["y"]}, "features": {"g": {"properties": {"t": 30.5}}}},
    "c": {"attributes": {"n": 3, "s": "Gamma", "flag": False, "nested": {"k": "v"}}},
    "d": {
        "attributes": {"n": 2.0, "s": "delta", "nul": None},
        "features": {"f": {"properties": {"t": 10}}, "h": {}},
    },
    "e": {"features": {"f": {"properties": {"t": "20"}}}},
}


@pytest_asyncio.fixture(loop_scope="session")
async def basic(client: httpx.AsyncClient) -> str:
    ns = namespace()
    for name, doc in BASIC.items():
        await create(client, f"{ns}:{name}", doc)
    return ns


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('eq(attributes/s,"alpha")', "a"),
        ("eq(attributes/n,2)", "bd"),  # 2 == 2.0
        ('eq(attributes/n,"2")', ""),  # no conversion
        ("ne(attributes/n,2)", "ac"),  # ne needs the field
        ("not(eq(attributes/n,2))", "ace"),
        ("gt(attributes/n,1)", "bcd"),
        ("ge(attributes/n,2)", "bcd"),
        ("lt(attributes/n,2)", "a"),
        ("le(attributes/n,2)", "abd"),
        ('gt(attributes/s,"beta")', "d"),  # code point order: "Gamma" < "alpha"
        ('like(attributes/s,"*a")', "abcd"),
        ('like(attributes/s,"?eta")', "b"),
        ('like(attributes/s,"gam*")', ""),
        ('ilike(attributes/s,"gam*")', "c"),
        ('in(attributes/s,"beta","delta","nope")', "bd"),
        ("in(attributes/n,3,7)", "c"),
        ('eq(attributes/tags,"y")', "ab"),  # arrays match by element
        ("eq(attributes/flag,true)", "a"),
        ("eq(attributes/flag,false)", "c"),
        ("eq(attributes/nul,null)", "d"),
        ("exists(attributes/flag)", "ac"),
        ("exists(attributes/nul)", "d"),
        ("exists(attributes/nested/k)", "c"),
        ("not(exists(attributes))", "e"),
        ("exists(features/h)", "d"),
        ("eq(features/f/properties/t,20)", "a"),
        ("gt(features/*/properties/t,15)", "ab"),
        ('eq(features/*/properties/t,"20")', "e"),
        ("exists(features/*/properties)", "abde"),
        ('and(gt(attributes/n,1),like(attributes/s,"*ta"))', "bd"),
        ('or(eq(attributes/n,1),eq(attributes/s,"Gamma"),exists(features/g))', "abc"),
        ("not(or(eq(attributes/n,1),exists(features/f)))", "bc"),
        ("and(not(eq(attributes/n,2)),exists(features))", "ae"),
        ('like(thingId,"*:?")', "abcde"),
        ("eq(_revision,1)", "abcde"),
        ("gt(_revision,1)", ""),
    ],
)
async def test_filter_operators(
    client: httpx.AsyncClient, basic: str, filter_text: str, expected: str
) -> None:
    found = await ids(client, filter=filter_text, namespaces=basic, option="sort(+thingId)")
    assert found == [f"{basic}:{c}" for c in expected], filter_text
    assert await count(client, filter=filter_text, namespaces=basic) == len(expected)
    # the same on POST with a form body
    r = await client.post(
        SEARCH, content=urlencode({"filter": filter_text, "namespaces": basic}), headers=FORM
    )
    assert r.status_code == 200, r.text
    assert sorted(i["thingId"] for i in r.json()["items"]) == [f"{basic}:{c}" for c in expected]
    r = await client.post(
        COUNT, content=urlencode({"filter": filter_text, "namespaces": basic}), headers=FORM
    )
    assert r.status_code == 200 and r.json() == len(expected), r.text


async def test_namespaces_fields_sort_and_shape(client: httpx.AsyncClient, basic: str) -> None:
    second = namespace()
    await create(client, f"{second}:a", {"attributes": {"n": 0}})
    both = f"{basic},{second}"
    assert await ids(client, namespaces=second) == [f"{second}:a"]
    assert len(await ids(client, namespaces=both)) == 6
    assert await ids(client, namespaces=both, filter='eq(_namespace,"' + second + '")') == [f"{second}:a"]
    assert await count(client, namespaces=both) == 6
    assert await count(client, namespaces=f"{second},org.nothing.here") == 1

    page = await search(client, namespaces=basic, option="sort(+thingId)")
    assert "cursor" not in page
    assert page["items"][0] == {"thingId": f"{basic}:a", "policyId": f"{basic}:a", **BASIC["a"]}

    page = await search(
        client, namespaces=basic, fields="thingId,_revision,attributes/s", option="sort(+thingId)"
    )
    assert page["items"][:2] == [
        {"thingId": f"{basic}:a", "_revision": 1, "attributes": {"s": "alpha"}},
        {"thingId": f"{basic}:b", "_revision": 1, "attributes": {"s": "beta"}},
    ]
    assert page["items"][4] == {"thingId": f"{basic}:e", "_revision": 1}

    assert await ids(client, namespaces=basic, option="sort(-thingId)") == [f"{basic}:{c}" for c in "edcba"]
    # absent first ascending; numbers exactly (2 == 2.0: thingId breaks the tie)
    assert await ids(client, namespaces=basic, option="sort(+attributes/n)") == [
        f"{basic}:{c}" for c in "eabdc"
    ]
    assert await ids(client, namespaces=basic, option="sort(-attributes/n,-thingId)") == [
        f"{basic}:{c}" for c in "cdbae"
    ]
    assert await ids(client, namespaces=basic, option="sort(+attributes/flag,-attributes/s)") == [
        f"{basic}:{c}"
        for c in "dbeca"  # absent flag first; descending puts an absent s last
    ]
    # the option parameter may be given more than once (Swagger UI sends one per line)
    r = await client.get(
        SEARCH, params=[("namespaces", basic), ("option", "size(2)"), ("option", "sort(-thingId)")]
    )
    assert r.status_code == 200, r.text
    assert [i["thingId"] for i in r.json()["items"]] == [f"{basic}:e", f"{basic}:d"]
    assert "cursor" in r.json()


async def test_sizes_and_cursors(client: httpx.AsyncClient) -> None:
    ns = namespace()
    names = [f"{ns}:t{i:03d}" for i in range(230)]
    sem = asyncio.Semaphore(32)

    async def put(thing_id: str, i: int) -> None:
        async with sem:
            await create(client, thing_id, {"attributes": {"i": i, "odd": i % 2 == 1}})

    await asyncio.gather(*(put(t, i) for i, t in enumerate(names)))
    page = await search(client, namespaces=ns)
    assert len(page["items"]) == 25 and "cursor" in page  # default size 25
    page = await search(client, namespaces=ns, option="size(200)")
    assert len(page["items"]) == 200 and "cursor" in page
    rest = await search(client, namespaces=ns, option=f"size(200),cursor({page['cursor']})")
    assert len(rest["items"]) == 30 and "cursor" not in rest
    assert sorted(i["thingId"] for i in page["items"] + rest["items"]) == names
    assert len(await ids(client, namespaces=ns, filter="eq(attributes/odd,true)", option="size(115)")) == 115
    page = await search(client, namespaces=ns, filter="eq(attributes/odd,true)", option="size(115)")
    assert "cursor" not in page  # exactly 115 matches: no further page

    for size in (1, 7, 50):
        items = await walk(client, size, namespaces=ns, option="sort(-attributes/i)")
        assert [i["thingId"] for i in items] == names[::-1]
    items = await walk(client, 9, namespaces=ns, filter="eq(attributes/odd,false)", option="sort(+thingId)")
    assert [i["thingId"] for i in items] == names[::2]
    assert await count(client, namespaces=ns) == 230

    # Ditto's deprecated limit(offset,count), still used by its JS client: nextPageOffset, -1 at the end
    offsets, pages = [0], []
    while offsets[-1] != -1:
        r = await search(client, namespaces=ns, option=f"sort(-attributes/i),limit({offsets[-1]},47)")
        assert "cursor" not in r
        pages.append([i["thingId"] for i in r["items"]])
        offsets.append(r["nextPageOffset"])
    assert offsets == [0, 47, 94, 141, 188, -1]
    assert [len(p) for p in pages] == [47, 47, 47, 47, 42]
    assert [t for p in pages for t in p] == names[::-1]
    odd = await search(client, namespaces=ns, filter="eq(attributes/odd,true)", option="limit(100,15)")
    assert [i["thingId"] for i in odd["items"]] == names[201::2] and odd["nextPageOffset"] == -1

    for bad in (
        "size(201)",
        "size(0)",
        "size(-1)",
        "size(x)",
        "limit(0,201)",
        "limit(0,10),size(10)",
        "sort(+a),sort(-b)",
        "bogus(1)",
    ):
        assert_error(
            await client.get(SEARCH, params={"namespaces": ns, "option": bad}), 400, "rql.expression.invalid"
        )
    cursor = page = (await search(client, namespaces=ns, option="size(3),sort(+thingId)"))["cursor"]
    assert_error(
        await client.get(
            SEARCH, params={"namespaces": ns, "option": f"size(3),sort(-thingId),cursor({cursor})"}
        ),
        400,
        "things:search.option.invalid",
    )
    assert_error(
        await client.get(SEARCH, params={"namespaces": ns, "option": f"size(3),cursor({cursor})"}),
        400,
        "things:search.option.invalid",
    )
    for garbage in ("nonsense", "AAAA", cursor[:-3], "W10", *map(b64, CRAFTED)):
        assert_error(
            await client.get(
                SEARCH, params={"namespaces": ns, "option": f"sort(+thingId),cursor({garbage})"}
            ),
            400,
            "things:search.option.invalid",
        )
    r = await client.get(
        SEARCH, params={"namespaces": ns, "option": f"size(3),sort(+thingId),cursor({cursor})"}
    )
    assert r.status_code == 200 and [i["thingId"] for i in r.json()["items"]] == names[3:6]


@pytest.mark.parametrize(
    ("filter_text", "position"),
    [
        ("eq(attributes/a 1)", 16),
        ("eq(attributes/a,1", 17),
        ("foo(attributes/a,1)", 0),
        ('and(eq(attributes/a,1),eq(attributes/b,"x)', 39),
        ("eq(attributes/a,1))", 18),
    ],
)
async def test_invalid_rql(client: httpx.AsyncClient, filter_text: str, position: int) -> None:
    for r in (
        await client.get(SEARCH, params={"filter": filter_text}),
        await client.get(COUNT, params={"filter": filter_text}),
        await client.post(SEARCH, content=urlencode({"filter": filter_text}), headers=FORM),
    ):
        error = assert_error(r, 400, "rql.expression.invalid")
        assert f"position {position}" in error["message"], error


async def test_invalid_parameters(client: httpx.AsyncClient) -> None:
    assert_error(
        await client.get(SEARCH, params={"namespaces": "not a namespace!"}), 400, "things:id.invalid"
    )
    assert_error(
        await client.get(SEARCH, params={"fields": "attributes/(("}), 400, "json.fieldselector.invalid"
    )
    r = await client.post(SEARCH, json={"filter": "exists(thingId)"})
    assert_error(r, 415, "mediatype.unsupported")
    r = await client.post(COUNT, content=b"filter=exists(thingId)", headers={"content-type": "text/plain"})
    assert_error(r, 415, "mediatype.unsupported")
    r = await client.post(SEARCH, content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text  # no body: nothing to reject


async def test_search_sees_acknowledged_writes(client: httpx.AsyncClient) -> None:
    ns = namespace()
    for i in range(20):
        thing_id = f"{ns}:w{i}"
        r = await client.put(url(thing_id), json={"attributes": {"v": i}})
        assert r.status_code == 201, r.text
        assert await ids(client, namespaces=ns, filter=f"eq(attributes/v,{i})") == [thing_id]
        r = await client.put(url(thing_id, "/attributes/v"), json=i + 1000)
        assert r.status_code == 204, r.text
        assert await ids(client, namespaces=ns, filter=f"eq(attributes/v,{i})") == []
        assert await ids(client, namespaces=ns, filter=f"eq(attributes/v,{i + 1000})") == [thing_id]
    r = await client.delete(url(f"{ns}:w0"))
    assert r.status_code == 204, r.text
    assert await count(client, namespaces=ns) == 19
    assert f"{ns}:w0" not in await ids(client, namespaces=ns, option="size(200)")


# ---- policies against a brute-force reference --------------------------------------------

SUBJECTS = {"ditto": "nginx:ditto", "other": "nginx:other"}
PATHS = [
    "thing:/",
    "thing:/attributes",
    "thing:/attributes/secret",
    "thing:/attributes/a",
    "thing:/attributes/nested/x",
    "thing:/features",
    "thing:/features/f1",
    "thing:/features/f1/properties/t",
    "thing:/features/f2",
    "thing:/policyId",
]
STRINGS = ["x", "y", "ab", "Ab", "b", ""]
FILTER_FIELDS = [
    "attributes/a",
    "attributes/b",
    "attributes/secret",
    "attributes/tags",
    "attributes/nested/x",
    "attributes/nested",
    "features/f1/properties/t",
    "features/f2/properties/s",
    "features/*/properties/t",
    "features/*/properties/s",
    "policyId",
]
SORTS = [
    "",
    "sort(+thingId)",
    "sort(-attributes/a)",
    "sort(+attributes/b,-features/f1/properties/t)",
    "sort(-_revision,+attributes/nested/x)",
]


def random_policy(rnd: random.Random) -> dict[str, Any]:
    doc = full_access("nginx:ditto")
    doc["entries"]["owner"]["resources"]["thing:/"] = {"grant": ["WRITE"], "revoke": []}  # reads are random
    for i in range(rnd.randint(1, 4)):
        subjects = rnd.choice(
            [["nginx:ditto"], ["nginx:other"], ["nginx:other"], ["nginx:ditto", "nginx:other"]]
        )
        resources = {}
        for path in rnd.sample(PATHS, rnd.randint(1, 3)):
            resources[path] = (
                {"grant": ["READ"], "revoke": []} if rnd.random() < 0.7 else {"grant": [], "revoke": ["READ"]}
            )
        doc["entries"][f"e{i}"] = {
            # an expiring subject reads through the policy-aware path even where it reads all
            "subjects": {
                s: {"type": "test"} if rnd.random() < 0.8 else {"type": "t", "expiry": "2099-01-01T00:00:00Z"}
                for s in subjects
            },
            "resources": resources,
        }
    return doc


def random_thing(rnd: random.Random, policy_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"policyId": policy_id}
    attributes: dict[str, Any] = {}
    if rnd.random() < 0.8:
        attributes["a"] = rnd.choice(
            [rnd.randint(0, 9), rnd.randint(0, 9) + 0.5, rnd.choice(STRINGS), None, True]
        )
    if rnd.random() < 0.7:
        attributes["b"] = rnd.choice(STRINGS)
    if rnd.random() < 0.6:
        attributes["secret"] = rnd.choice(["x", "y", 1])
    if rnd.random() < 0.3:
        attributes["tags"] = rnd.sample(STRINGS, rnd.randint(0, 3))
    if rnd.random() < 0.5:
        attributes["nested"] = {"x": rnd.randint(0, 5)} if rnd.random() < 0.8 else {"y": 1}
    if attributes or rnd.random() < 0.5:
        doc["attributes"] = attributes
    features: dict[str, Any] = {}
    for name in ("f1", "f2", "f3"):
        if rnd.random() < 0.5:
            props: dict[str, Any] = {}
            if rnd.random() < 0.7:
                props["t"] = rnd.choice([rnd.randint(0, 40), rnd.randint(0, 40) / 4])
            if rnd.random() < 0.5:
                props["s"] = rnd.choice(STRINGS)
            features[name] = {"properties": props}
    if features:
        doc["features"] = features
    return doc


def literal(rnd: random.Random) -> str:
    kind = rnd.random()
    if kind < 0.45:
        return str(rnd.choice([rnd.randint(0, 9), rnd.randint(0, 40) / 4]))
    if kind < 0.9:
        return '"' + rnd.choice([*STRINGS, "x", "y"]) + '"'
    return rnd.choice(["true", "false", "null"])


def random_filter(rnd: random.Random, depth: int = 0) -> str:
    roll = rnd.random()
    if depth < 2 and roll < 0.3:
        op = rnd.choice(["and", "or", "not"])
        if op == "not":
            return f"not({random_filter(rnd, depth + 1)})"
        return f"{op}({','.join(random_filter(rnd, depth + 1) for _ in range(rnd.randint(2, 3)))})"
    field = rnd.choice(FILTER_FIELDS)
    op = rnd.choice(["eq", "eq", "ne", "gt", "ge", "lt", "le", "like", "in", "exists"])
    if op == "exists":
        return f"exists({field})"
    if op == "in":
        return f"in({field},{','.join(literal(rnd) for _ in range(rnd.randint(1, 3)))})"
    if op == "like":
        return f'like({field},"{rnd.choice(["*", "a*", "?", "*b", "x"])}")'
    value = literal(rnd)
    if op in ("gt", "ge", "lt", "le") and value in ("true", "false", "null"):
        value = "1"
    return f"{op}({field},{value})"


def parse_sort(option: str) -> list[tuple[rql.Field, bool]]:
    return rql.parse_options(option).sort if option else []


class Reference:
    """Every thing of the namespace as each user may read it, straight from the database."""

    def __init__(self, rows: list[Any], policy_docs: dict[str, dict[str, Any]]) -> None:
        enforcers = {
            pid: policies.Enforcer(policies.parse_policy(doc, pid)) for pid, doc in policy_docs.items()
        }
        self.readable: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        self.hidden_secrets: dict[str, int] = {}
        for user, subject in SUBJECTS.items():
            visible = []
            for row in rows:
                view = enforcers[row["policy_id"]].view((subject,))
                state = ThingState(
                    thing_id=row["id"],
                    revision=row["revision"],
                    created=row["created"],
                    modified=row["modified"],
                    doc=row["doc"],
                )
                shown = readable_thing(view, state)
                if shown is not None:
                    meta = {
                        "_revision": row["revision"],
                        "_created": row["created"],
                        "_modified": row["modified"],
                    }
                    visible.append((shown, meta))
            self.readable[user] = visible

    def expected(self, user: str, filter_text: str | None, sort: str) -> list[dict[str, Any]]:
        node = rql.parse_filter(filter_text) if filter_text else None
        found = [
            (doc, meta) for doc, meta in self.readable[user] if node is None or rql.matches(node, doc, meta)
        ]
        terms = parse_sort(sort)
        found.sort(key=lambda item: item[0]["thingId"].encode())  # code point order (stable sorts below)
        for i in reversed(range(len(terms))):
            field, ascending = terms[i]
            found.sort(key=lambda item, f=field: rql.sort_key(f, item[0], item[1]), reverse=not ascending)
        return [doc for doc, _ in found]


async def populate(
    client: httpx.AsyncClient, runtime: Runtime, rnd: random.Random, n_things: int, n_policies: int
) -> tuple[str, Reference]:
    ns = namespace()
    policy_docs = {f"{ns}:policy{i}": random_policy(rnd) for i in range(n_policies)}
    # one policy where `other` reads everything but the secret (for the leak checks)
    policy_docs[f"{ns}:nosecret"] = full_access("nginx:ditto")
    policy_docs[f"{ns}:nosecret"]["entries"]["other"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]},
        },
    }
    for pid, doc in policy_docs.items():
        await make_policy(client, pid, doc)
    sem = asyncio.Semaphore(32)
    pids = sorted(policy_docs)

    async def put(i: int, doc: dict[str, Any]) -> None:
        async with sem:
            r = await client.put(url(f"{ns}:t{i:05d}"), json=doc)
            assert r.status_code == 201, r.text

    docs = [random_thing(rnd, rnd.choice(pids)) for _ in range(n_things)]
    for i in range(40):  # secrets that `other` must never be able to probe
        docs[i] = {**docs[i], "policyId": f"{ns}:nosecret", "attributes": {"secret": "x", "a": i}}
    await asyncio.gather(*(put(i, doc) for i, doc in enumerate(docs)))
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        rows = await con.fetch(
            "SELECT id, revision, created, modified, doc, policy_id FROM things "
            "WHERE id LIKE $1 AND doc IS NOT NULL",
            ns + ":%",
        )
    assert len(rows) == n_things
    return ns, Reference(list(rows), policy_docs)


async def check_against_reference(
    clients: dict[str, httpx.AsyncClient], ns: str, ref: Reference, rnd: random.Random, n_filters: int
) -> None:
    filters = [
        None,
        'eq(attributes/secret,"x")',
        'not(eq(attributes/secret,"x"))',
        "exists(attributes/secret)",
    ]
    filters += [random_filter(rnd) for _ in range(n_filters)]
    for filter_text in filters:
        for user, client in clients.items():
            params = {"namespaces": ns} | ({"filter": filter_text} if filter_text else {})
            for sort in rnd.sample(SORTS, 2):
                expected = ref.expected(user, filter_text, sort)
                got = await walk(client, 200, option=sort, **params)
                context = (user, filter_text, sort)
                assert [i["thingId"] for i in got] == [d["thingId"] for d in expected], context
                assert got == expected, context
            assert await count(client, **params) == len(expected), (user, filter_text)
            # small pages: each match exactly once, in order
            size = rnd.choice([1, 3, 10, 37]) if len(expected) <= 150 else rnd.choice([61, 97])
            sort = rnd.choice(SORTS)
            paged = await walk(client, size, option=sort, **params)
            assert [i["thingId"] for i in paged] == [
                d["thingId"] for d in ref.expected(user, filter_text, sort)
            ], (
                user,
                filter_text,
                sort,
                size,
            )


async def check_no_leak(clients: dict[str, httpx.AsyncClient], ns: str, ref: Reference) -> None:
    other = clients["other"]
    probe = {"namespaces": ns, "option": "size(200)"}
    # the 40 things under `nosecret` all hold secret "x", readable to ditto only
    secret_x = {f"{ns}:t{i:05d}" for i in range(40)}
    ditto_ids = {
        i["thingId"]
        for i in await walk(clients["ditto"], 200, namespaces=ns, filter='eq(attributes/secret,"x")')
    }
    assert secret_x <= ditto_ids
    for leaf in (
        'eq(attributes/secret,"x")',
        "exists(attributes/secret)",
        'like(attributes/secret,"*")',
        'gt(attributes/secret,"")',
    ):
        for f in (
            leaf,
            f"and(exists(thingId),{leaf})",
            f"or({leaf},eq(attributes/nothing,1))",
            f"not(not({leaf}))",
        ):
            got = {i["thingId"] for i in await walk(other, 200, namespaces=ns, filter=f)}
            assert not got & secret_x, f
    # not(...) of a hidden field matches as if the field were absent
    negated = {
        i["thingId"] for i in await walk(other, 200, namespaces=ns, filter='not(eq(attributes/secret,"x"))')
    }
    assert secret_x <= negated
    everything = {i["thingId"] for i in await walk(other, 200, namespaces=ns)}
    assert secret_x <= everything
    (item,) = (await search(other, filter=f'eq(thingId,"{ns}:t00000")', **probe))["items"]
    assert item["policyId"] == f"{ns}:nosecret" and item["attributes"] == {"a": 0}, item
    # sorting by the hidden field puts these things where an absent value goes (first, ascending)
    first = await search(
        other,
        namespaces=ns,
        filter="lt(attributes/a,40)",
        option="sort(+attributes/secret,+thingId),size(200)",
    )
    expected = ref.expected("other", "lt(attributes/a,40)", "sort(+attributes/secret,+thingId)")
    assert [i["thingId"] for i in first["items"]] == [d["thingId"] for d in expected][:200]


@pytest.mark.parametrize("seed", [1])
async def test_policies_against_reference(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, seed: int
) -> None:
    rnd = random.Random(seed)
    t0 = time.monotonic()
    ns, ref = await populate(client, runtime, rnd, 2000, 14)
    print(f"populated in {time.monotonic() - t0:.1f}s")
    clients = {"ditto": client, "other": other}
    assert ref.readable["other"] and ref.readable["ditto"]
    await check_no_leak(clients, ns, ref)
    t1 = time.monotonic()
    await check_against_reference(clients, ns, ref, rnd, 14)
    print(f"checked in {time.monotonic() - t1:.1f}s")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TWINSTORE_TEST_SLOW_SEARCH"), reason="set TWINSTORE_TEST_SLOW_SEARCH=1"
)
async def test_policies_against_reference_large(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime
) -> None:
    rnd = random.Random(7)
    ns, ref = await populate(client, runtime, rnd, 8000, 12)
    clients = {"ditto": client, "other": other}
    await check_no_leak(clients, ns, ref)
    await check_against_reference(clients, ns, ref, rnd, 30)


# ---- cursor stability under concurrent writes ---------------------------------------------


async def test_cursor_stable_under_concurrent_writes(client: httpx.AsyncClient) -> None:
    ns = namespace()
    stable = [f"{ns}:s{i:03d}" for i in range(150)]
    sem = asyncio.Semaphore(32)

    async def put(thing_id: str, rank: int) -> None:
        async with sem:
            await create(client, thing_id, {"attributes": {"rank": rank, "kind": "stable"}})

    await make_policy(client, f"{ns}:shared")
    await asyncio.gather(*(put(t, i * 10) for i, t in enumerate(stable)))
    for sort, order in (
        ("sort(+attributes/rank)", stable),
        ("sort(-attributes/rank)", stable[::-1]),
        ("sort(+thingId)", stable),
    ):
        stop = asyncio.Event()
        churned: list[str] = []

        async def churn(sort: str, stop: asyncio.Event, churned: list[str]) -> None:
            rnd = random.Random(sort)
            n = 0
            live: list[str] = []
            while not stop.is_set():
                n += 1
                # names and ranks sorting both before and after wherever the cursor is
                thing_id = f"{ns}:{rnd.choice('aszz')}{n:05d}"
                rank = rnd.randint(-5, 1500) + 0.5
                doc = {"policyId": f"{ns}:shared", "attributes": {"rank": rank, "kind": "churn"}}
                r = await client.put(url(thing_id), json=doc)
                assert r.status_code == 201, r.text
                live.append(thing_id)
                churned.append(thing_id)
                if len(live) > 5:
                    victim = live.pop(rnd.randrange(len(live)))
                    r = await client.delete(url(victim))
                    assert r.status_code == 204, r.text
                await asyncio.sleep(0)

        task = asyncio.create_task(churn(sort, stop, churned))
        try:
            seen: list[str] = []
            cursor = None
            while True:
                option = f"{sort},size(10)" + (f",cursor({cursor})" if cursor else "")
                page = await search(client, namespaces=ns, option=option)
                seen += [i["thingId"] for i in page["items"]]
                written = len(churned)  # the churn writes between pages

                def wrote(churned: list[str] = churned, written: int = written) -> bool:
                    return len(churned) > written

                await eventually(wrote, 10, "a churn write between two pages")
                cursor = page.get("cursor")
                if cursor is None:
                    break
        finally:
            stop.set()
            await bounded(task, 30, "the churn's last write")
        assert len(churned) > 20, "the churn ran alongside the walk"
        assert len(seen) == len(set(seen)), "nothing twice"
        assert [t for t in seen if t in set(stable)] == order, "every stable thing once, in order"
        for thing_id in churned:  # leave only the stable things behind
            await client.delete(url(thing_id))
        assert await count(client, namespaces=ns) == len(stable)
