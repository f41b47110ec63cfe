"""A Python application on twinstore: create a twin, read it, patch it, and watch its changes.

Uses only httpx and websockets (Ditto's HTTP API v2 and the Ditto Protocol over WebSocket), so
it works against Eclipse Ditto too.

    .venv/bin/python examples/app.py --url http://127.0.0.1:8080 --user ditto --password ditto
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json

import httpx
from websockets.asyncio.client import connect


async def main(url: str, user: str, password: str, thing_id: str) -> None:
    async with httpx.AsyncClient(base_url=url, auth=(user, password), timeout=10) as http:
        # Create (or replace) the twin: 201 the first time, 204 afterwards.
        thing = {
            "attributes": {"site": "north"},
            "features": {"flow": {"properties": {"rate": 12.0, "pressure": 2.1}}},
        }
        r = await http.put(f"/api/2/things/{thing_id}", json=thing)
        r.raise_for_status()
        print("created" if r.status_code == 201 else "replaced", thing_id)

        # Read one property, and the whole thing with a field selection.
        r = await http.get(f"/api/2/things/{thing_id}/features/flow/properties/rate")
        print("rate =", r.json())
        r = await http.get(f"/api/2/things/{thing_id}", params={"fields": "thingId,_revision"})
        print("thing:", r.json())

        # Watch changes over the WebSocket (Ditto Protocol), then make one with a merge patch.
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        ws_url = url.replace("http", "ws", 1) + "/ws/2"
        async with connect(ws_url, additional_headers={"Authorization": f"Basic {token}"}) as ws:
            await ws.send("START-SEND-EVENTS?filter=" + f'eq(thingId,"{thing_id}")')
            assert await ws.recv() == "START-SEND-EVENTS:ACK"
            r = await http.patch(
                f"/api/2/things/{thing_id}/features/flow/properties",
                json={"rate": 13.5},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            r.raise_for_status()
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            print("event:", event["topic"], event["path"], event["value"], "revision", event["revision"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--user", default="ditto")
    parser.add_argument("--password", default="ditto")
    parser.add_argument("--thing", default="org.acme:pump-1")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.user, args.password, args.thing))
