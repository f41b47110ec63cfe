"""The official Ditto JavaScript client (npm ``@eclipse-ditto/ditto-javascript-client-node``), unmodified.

``js/ditto-client.js`` drives the client against a real ``twinstore serve`` process: over HTTP
create, read, modify, merge, delete, If-Match/If-None-Match, definitions, policies, search
(filter, sort, fields, cursor, form POST) and count; over the WebSocket create, retrieve,
modify, merge, delete, features and event subscriptions that see changes made over HTTP.
The script checks each answer itself and exits non-zero on the first failure; this test also
checks the JSON it prints and the state it left on the server.

``make test`` installs the client (``npm ci`` in ``js/``, pinned by ``package-lock.json``). In CI
(``CI`` set) a missing node or client fails the test; elsewhere it is skipped with a hint.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.api.test_whoami import ISSUER, token
from tests.conftest import AUTH, require

JS = Path(__file__).resolve().parent / "js"
CLIENT = JS / "node_modules" / "@eclipse-ditto" / "ditto-javascript-client-node" / "package.json"

pytestmark = pytest.mark.slow


def node() -> str:
    """The node executable; fails in CI when node or the installed client is missing, else skips."""
    exe = shutil.which("node")
    problem = None
    if exe is None:
        problem = "node is not installed"
    elif not CLIENT.exists():
        problem = "the Ditto JS client is not installed: run `make test` or `npm ci` in tests/clients/js"
    require(problem is None, str(problem))
    assert exe is not None
    return exe


async def run_script(exe: str, domain: str, namespace: str, **extra: str) -> tuple[int, dict[str, Any], str]:
    env = {
        **os.environ,
        "TWINSTORE_DOMAIN": domain,
        "TWINSTORE_USER": AUTH[0],
        "TWINSTORE_PASSWORD": AUTH[1],
        "TWINSTORE_NAMESPACE": namespace,
        **extra,
    }
    proc = await asyncio.create_subprocess_exec(
        exe,
        "ditto-client.js",
        cwd=JS,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = out.decode().strip().splitlines()
    results = json.loads(lines[-1]) if lines else {}
    assert proc.returncode is not None
    return proc.returncode, results, err.decode()


async def test_ditto_js_client_over_http_and_websocket(server_process: Any) -> None:
    exe = node()
    server = await asyncio.to_thread(server_process().start)
    namespace = f"org.jsclient{secrets.token_hex(4)}"
    code, results, stderr = await run_script(exe, f"127.0.0.1:{server.port}", namespace)
    assert code == 0, f"the client script failed: {stderr}\nresults so far: {results}"
    assert "Unmatched message" not in stderr, stderr

    thing = f"{namespace}:http-1"
    assert results["http_create"] == {"status": 201, "thingId": thing, "policyId": thing}
    assert results["http_read"]["attributes"] == {"site": "north", "floor": 1}
    assert results["http_read"]["fields"] == {"site": "north"}
    assert results["http_modify"] == {
        "putAttribute": 204,
        "putNewAttribute": 201,
        "putFeature": 201,
        "putProperty": 204,
        "property": 21.5,
        "floor": 2,
    }
    merge = results["http_merge"]
    assert (merge["patchThing"], merge["patchAttributes"], merge["patchProperties"]) == (204, 204, 204)
    location = {"room": "r1", "building": "b7"}
    assert merge["attributes"] == {"site": "north", "merged": True, "location": location}
    assert merge["properties"] == {"value": 21.5, "unit": "C"}
    assert results["http_post_and_list"]["generated"] == "org.eclipse.ditto"
    search = results["http_search"]
    assert search["ids"] == [thing, f"{namespace}:http-3"]
    assert search["firstPage"] == [{"thingId": f"{namespace}:http-4", "attributes": {"n": 4}}]
    assert search["secondPage"] == [f"{namespace}:http-3"]
    assert search["posted"] == [f"{namespace}:http-2", f"{namespace}:http-4"]
    assert search["limited"] == [f"{namespace}:http-2", f"{namespace}:http-3"]
    assert results["http_count"] == {"north": 2, "all": 4, "posted": 2}
    assert results["http_preconditions"] == {
        "etag": '"rev:1"',
        "ifMatch": 204,
        "stale": 412,
        "ifNoneMatch": 412,
        "value": 2,
    }
    assert results["http_definitions"] == {
        "definition": "org.acme:pump:1.0.0",
        "policyId": True,
        "featureDefinition": ["org.acme:motor:1.0.0"],
    }
    assert results["http_policies"] == {
        "putPolicy": 201,
        "putSubject": 201,
        "putResource": 201,
        "resources": ["policy:/", "thing:/", "thing:/features/secret"],
        "deletePolicy": 204,
    }
    assert results["http_delete"] == {
        "deleteAttribute": 204,
        "deleteThing": 204,
        "error": "things:thing.notfound",
        "status": 404,
        "count": 3,
    }

    ws_thing = f"{namespace}/ws-1/things/twin"
    assert results["ws_create"] == {"status": 201, "thingId": f"{namespace}:ws-1"}
    assert results["ws_retrieve"]["attributes"] == {"site": "west"}
    assert results["ws_retrieve"]["property"] == 20
    assert results["ws_modify"] == {
        "putAttribute": 201,
        "patchAttributes": 204,
        "attributes": {"site": "east", "level": 3},
    }
    assert results["ws_features"] == {
        "missing": 404,
        "putFeature": 201,
        "putProperty": 204,
        "patchProperties": 204,
        "properties": {"on": True, "rpm": 1200},
        "deleteFeature": 204,
    }
    events = results["ws_events"]
    assert events["thing"] == [
        {
            "topic": f"{ws_thing}/events/modified",
            "action": "modified",
            "path": "/attributes/level",
            "value": 4,
        },
        {
            "topic": f"{ws_thing}/events/modified",
            "action": "modified",
            "path": "/features/temp/properties/value",
            "value": 31,
        },
        {
            "topic": f"{ws_thing}/events/merged",
            "action": "merged",
            "path": "/features/temp/properties",
            "value": {"unit": "C"},
        },
        {"topic": f"{ws_thing}/events/deleted", "action": "deleted", "path": "/attributes/site"},
    ]
    assert events["property"] == [events["thing"][1]]
    assert events["all"] == 4
    assert results["ws_delete"] == {"status": 204, "error": "things:thing.notfound", "errorStatus": 404}

    # What the client did is on the server, read back independently of the client.
    async with httpx.AsyncClient(base_url=server.url, auth=AUTH) as http:
        gone = await http.get(f"/api/2/things/{thing}")
        assert gone.status_code == 404
        kept = await http.get(f"/api/2/things/{namespace}:http-2")
        assert kept.status_code == 200 and kept.json()["attributes"] == {"site": "south", "n": 2}
        assert (await http.get(f"/api/2/things/{namespace}:ws-1")).status_code == 404
        count = await http.get("/api/2/search/things/count", params={"namespaces": namespace})
        assert count.json() == 3


async def test_ditto_js_client_with_a_bearer_token(
    server_process: Any, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    """``NodeHttpBearerAuth``: a JWT on HTTP requests and on the WebSocket upgrade."""
    exe = node()
    jwks = tmp_path / "jwks.json"
    public = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1"}]}))
    issuers = [{"issuer": ISSUER, "prefix": "idp", "audience": "twinstore", "jwks_file": str(jwks)}]
    server = await asyncio.to_thread(server_process(TWINSTORE_JWT_ISSUERS=json.dumps(issuers)).start)
    namespace = f"org.jsclient{secrets.token_hex(4)}"
    code, results, stderr = await run_script(
        exe, f"127.0.0.1:{server.port}", namespace, TWINSTORE_TOKEN=token(signing_key)
    )
    assert code == 0, f"the client script failed: {stderr}\nresults so far: {results}"
    assert results["jwt_http"] == {"status": 201, "attributes": {"owner": "jwt"}, "subjects": ["idp:alice"]}
    assert results["jwt_ws"] == {
        "attributes": {"owner": "jwt"},
        "event": {"action": "modified", "path": "/attributes/owner", "value": "jwt-2"},
    }
