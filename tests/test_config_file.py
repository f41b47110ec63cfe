"""`--config FILE` as the README documents it, with real `twinstore serve` processes: the file's
settings apply to every HTTP worker (`--workers 2` re-creates the app in each worker process),
and a config file that is missing or not TOML is one line and exit status 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port, stop_process
from twinstore.settings import Settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [1, 2])
def test_config_file_applies_to_every_worker(settings: Settings, tmp_path: Path, workers: int) -> None:
    config = tmp_path / "twinstore.toml"
    config.write_text("[twinstore]\nmax_body_bytes = 200\n")
    port = free_port()
    env = ServerProcess(settings, port).env
    env.update(TWINSTORE_INGEST_ENABLED="false", TWINSTORE_ANOMALY_ENABLED="false")
    env.pop("TWINSTORE_MAX_BODY_BYTES", None)
    env.pop("TWINSTORE_CONFIG", None)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twinstore.cli", "serve", "--port", str(port), "--workers",
             str(workers), "--config", str(config)],
            env=env,
            cwd=tmp_path,  # the config path is resolved before the workers start
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        thing = f"{url}/api/2/things/org.acme:config-{workers}"
        small = {"attributes": {"n": 1}}
        large = {"attributes": {"n": "x" * 300}}
        # A new connection per request, so the kernel hands them to both workers.
        for _ in range(20):
            with httpx.Client(auth=("ditto", "ditto"), timeout=10) as http:
                r = http.put(thing, json=large)
                assert r.status_code == 413, (r.status_code, r.text)
                assert r.json()["error"] == "things:thing.tooLarge"
        with httpx.Client(auth=("ditto", "ditto"), timeout=10) as http:
            assert http.put(thing, json=small).status_code in (201, 204)
    finally:
        stop_process(proc, 40)


@pytest.mark.parametrize("content", [None, "max_body_bytes = [unclosed\n"])
def test_unreadable_config_file_is_one_line(tmp_path: Path, content: str | None) -> None:
    config = tmp_path / "twinstore.toml"
    if content is not None:
        config.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "twinstore.cli", "serve", "--config", str(config), "--data-dir",
         str(tmp_path / "data"), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, out
    assert "Traceback" not in out, out
    assert len(out.splitlines()) == 1, out
    if content is None:
        assert out == f"twinstore: cannot read the config file {config}: No such file or directory"
    else:
        assert out.startswith(f"twinstore: the config file {config} is not valid TOML: ")
    assert not (tmp_path / "data").exists()  # nothing started
