"""The README's quick start, run as a reader runs it: its shell blocks, literally (curl and all),
in order, against a fresh development-mode `twinstore serve` on embedded PostgreSQL and NATS.
Only the port is changed, and the NATS URL is the one the start-up banner prints; `nats pub`
(the nats CLI is not needed) is played by nats-py with the same subject, headers and payload.
What the README says each step shows is checked after it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
AUTH = ("ditto", "ditto")


def quickstart_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Quick start\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


# ---- `nats pub` for the shell blocks ----------------------------------------------------------

def nats_pub(argv: list[str]) -> None:
    """`nats pub -s URL SUBJECT [-H K:V ...] BODY` as the nats CLI does it: one core NATS publish."""
    import nats

    parser = argparse.ArgumentParser(prog="nats")
    parser.add_argument("command", choices=["pub"])
    parser.add_argument("-s", "--server", required=True)
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("subject")
    parser.add_argument("body")
    args = parser.parse_args(argv)
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in args.header)}

    async def publish() -> None:
        nc = await nats.connect(args.server)
        try:
            await nc.publish(args.subject, args.body.encode(), headers=headers)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(publish())


# ---- one development-mode server ---------------------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, port: int, data: Path) -> None:
        self.proc, self.log, self.port, self.data = proc, log, port, data
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def nats_url(self) -> str:
        match = re.search(r"^  NATS +(nats://\S+)", self.output(), re.M)
        assert match, self.output()[-3000:]
        return match.group(1)


def processes_under(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # Not pytest's tmp_path: the embedded PostgreSQL's user must keep reaching it (as in
    # tests/test_first_start.py).
    root = Path(tempfile.mkdtemp(prefix="twinstore-readme-"))
    data, log, port = root / "data", root / "serve.log", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINSTORE_")}  # development mode
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twinstore.cli", "serve", "--data-dir", str(data), "--port", str(port),
             "--log-format", "text"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    srv = Server(proc, log, port, data)
    try:
        deadline = time.monotonic() + 120
        while "is ready on" not in srv.output():
            assert proc.poll() is None, srv.output()[-3000:]
            assert time.monotonic() < deadline, srv.output()[-3000:]
            time.sleep(0.1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in processes_under(data):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def run_block(server: Server, block: str, tmp: Path) -> list[tuple[int, str]]:
    """Run a README shell block with bash; (HTTP status, body) of every curl in it, in order."""
    script = block.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
    script = re.sub(r"^NATS_URL=\S+", f"NATS_URL={server.nats_url()}", script, flags=re.M)
    shim = tmp / "nats"
    shim.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                    "from tests.test_readme_quickstart import nats_pub\nnats_pub(sys.argv[1:])\n")
    shim.chmod(0o755)
    prelude = "curl() { command curl -sS -w '\\n@@HTTP %{http_code}@@\\n' \"$@\"; }\n"
    done = subprocess.run(
        ["bash", "-e", "-c", prelude + script],
        env={**os.environ, "PATH": f"{tmp}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (script, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    answers = re.findall(r"(.*?)\n?@@HTTP (\d{3})@@\n", done.stdout, re.S)
    return [(int(status), body.strip()) for body, status in answers]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_quickstart_runs_in_sequence(server: Server, tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    assert blocks[0].startswith("make run"), blocks[0]
    assert len(blocks) == 5, "the quick start's steps changed: update this test with them"
    create, read, device, anomaly = blocks[1:]
    http = httpx.Client(base_url=server.url, auth=AUTH, timeout=10)
    thing = "/api/2/things/org.acme:pump-1"

    # 1. the thing and its policy
    [(status, body)] = run_block(server, create, tmp_path)
    assert status == 201, body
    assert json.loads(body)["features"]["flow"]["properties"] == {"rate": 12.0, "pressure": 2.1}

    # 2. read, change, search, history
    answers = run_block(server, read, tmp_path)
    assert [s for s, _ in answers] == [200, 204, 200, 200], answers
    assert answers[0][1] == "21.5"
    assert [i["thingId"] for i in json.loads(answers[2][1])["items"]] == ["org.acme:pump-1"]
    assert answers[3][1] == "21.5"

    # 3. a device publishes over NATS: the row is applied (a human reads a moment later)
    run_block(server, device, tmp_path)
    wait_for("rate 12.5 applied from NATS",
             lambda: http.get(thing + "/features/flow/properties/rate").json() == 12.5, timeout=20)
    r = http.get(thing + "/features/flow/properties/rate", params={"at-historical-revision": "3"})
    headers = json.loads(r.headers["historical-headers"])
    assert headers["source-quality"] == "Good"
    assert headers["source-timestamp"].startswith("2026-01-01T00:00:00.123")

    # 4. anomaly detection: the alarm is raised by the third far-off update
    answers = run_block(server, anomaly, tmp_path)
    assert answers[0][0] == 201 and all(s == 204 for s, _ in answers[1:-1]), answers
    latest = wait_for(
        "the anomaly stored",
        lambda: (r := http.get(thing + "/features/flow/anomaly")).status_code == 200
        and r.json()["revision"] == 66 and r.json(),
    )
    assert latest["anomalous"] is True and latest["score"] > latest["threshold"], latest
    # the figures the README shows
    assert round(latest["score"], 2) == 22665.75 and round(latest["threshold"], 2) == 7.50, latest
    items = http.get(thing + "/features/flow/anomaly/anomalies").json()["items"]
    assert [i["revision"] for i in items] == [66]
    [(status, body)] = run_block(server, anomaly.splitlines()[-1], tmp_path)  # the README's read
    assert status == 200 and json.loads(body)["anomalous"] is True
    # normal values again: the score drops under the threshold while the alarm is held
    for _ in range(20):
        assert http.patch(thing + "/features/flow/properties", content=b'{"rate": 12.3, "pressure": 2.1}',
                          headers={"content-type": "application/merge-patch+json"}).status_code == 204
    latest = wait_for(
        "twenty normal updates scored",
        lambda: (r := http.get(thing + "/features/flow/anomaly").json())["revision"] == 86 and r,
    )
    assert latest["score"] < latest["threshold"] and latest["anomalous"] is True, latest
