"""The scripts in examples/ run as a newcomer would run them, against a real ``twinstore serve``
process (real PostgreSQL and NATS), so they stay true."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT, ServerProcess, new_thing_id
from twinstore.settings import Settings


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_app_creates_reads_patches_and_sees_its_event_then_history_reads_it_back(
    live_server: ServerProcess,
) -> None:
    thing_id = new_thing_id("org.example")
    # In a thread: the session's runtime in this process may be the relay leader that publishes
    # the event the example waits for, so the event loop must keep running meanwhile.
    out = await asyncio.to_thread(run_example, "app.py", "--url", live_server.url, "--thing", thing_id)
    assert f"created {thing_id}" in out
    assert "rate = 12.0" in out
    assert "event: org.example/" in out and "/things/twin/events/merged" in out
    assert "{'rate': 13.5} revision 2" in out, out

    out = await asyncio.to_thread(run_example, "history.py", "--url", live_server.url, "--thing", thing_id)
    assert f"{thing_id} is at revision 2" in out
    assert "revision 1 by nginx:ditto" in out
    assert "revision 2:" in out and "13.5" in out, out


async def test_device_publishes_telemetry_over_nats(live_server: ServerProcess, settings: Settings) -> None:
    thing_id = new_thing_id("org.example")
    async with httpx.AsyncClient(base_url=live_server.url, auth=("ditto", "ditto")) as http:
        assert (await http.put(f"/api/2/things/{thing_id}", json={"features": {}})).status_code == 201
        out = await asyncio.to_thread(
            run_example,
            "device_nats.py",
            "--nats-url",
            settings.nats_url or "",
            "--prefix",
            settings.nats_prefix,
            "--partitions",
            str(settings.partitions),
            "--source",
            "ditto-user",  # writes as nginx:ditto (tests/conftest.py INGEST_SOURCES)
            "--thing",
            thing_id,
            "--count",
            "3",
        )
        assert out.count("published seq") == 3
        deadline = time.monotonic() + 15
        while True:
            r = await http.get(f"/api/2/things/{thing_id}", params={"fields": "_revision,features"})
            if r.status_code == 200 and r.json()["_revision"] >= 4:  # created + 3 messages (2 rows each)
                break
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.05)
        assert set(r.json()["features"]["flow"]["properties"]) == {"rate", "pressure"}
