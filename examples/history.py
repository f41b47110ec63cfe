"""Reading a twin's history: its state at a revision, who made each change, and a range of events.

.venv/bin/python examples/history.py --url http://127.0.0.1:8080 --thing org.acme:pump-1
"""

from __future__ import annotations

import argparse
import json

import httpx


def main(url: str, user: str, password: str, thing_id: str) -> None:
    with httpx.Client(base_url=url, auth=(user, password), timeout=10) as http:
        current = http.get(f"/api/2/things/{thing_id}", params={"fields": "_revision"})
        current.raise_for_status()
        revision = current.json()["_revision"]
        print(f"{thing_id} is at revision {revision}")

        # The thing as it was at revision 1, and who wrote that revision.
        r = http.get(f"/api/2/things/{thing_id}", headers={"at-historical-revision": "1"})
        r.raise_for_status()
        who = json.loads(r.headers["historical-headers"])
        print("revision 1 by", who.get("ditto-originator"), "at", r.headers["at-historical-timestamp"])
        print("  ", r.json())

        # Every change to one feature as a stream of events (Server-Sent Events; the stream ends
        # at the revision current when it started).
        with http.stream(
            "GET",
            f"/api/2/things/{thing_id}/features/flow",
            params={"from-historical-revision": "0"},
            headers={"Accept": "text/event-stream"},
        ) as stream:
            event_id = None
            for line in stream.iter_lines():
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:") and line[5:].strip():
                    print(f"revision {event_id}: {line[5:].strip()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--user", default="ditto")
    parser.add_argument("--password", default="ditto")
    parser.add_argument("--thing", default="org.acme:pump-1")
    a = parser.parse_args()
    main(a.url, a.user, a.password, a.thing)
