"""``twinstore-adapter`` as a process: a value goes through, SIGTERM stops it cleanly (exit 0),
a bad configuration is exit 2 with a message."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from tests.adapters.conftest import MqttPeer
from tests.adapters.test_mqtt import rows_on_stream
from twinstore.bus.ingest import IngestSubjects, Update

ADAPTER = [sys.executable, "-m", "adapters.cli"]


async def test_the_mqtt_adapter_process_forwards_and_stops_on_sigterm(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    config = tmp_path / "adapter.toml"
    config.write_text(
        f'nats_url = "{nats_url}"\nnats_prefix = "{prefix}"\npartitions = 4\n'
        f'source = "cli-{prefix}"\nspool_dir = "{tmp_path / "spool"}"\n'
        f'[mqtt]\nurl = "{mqtt_url}"\nclient_id = "cli-{prefix}"\nsession_expiry = 5\n'
        f'[[mappings]]\ntopic = "{prefix}/{{thing}}/v"\nthing = "org.acme:{{thing}}"\n'
        'feature = "f"\nproperty = "v"\n'
    )
    proc = subprocess.Popen([*ADAPTER, "mqtt", "--config", str(config)], stderr=subprocess.PIPE)
    try:
        with MqttPeer(mqtt_url) as device:
            for attempt in range(100):  # until the adapter has subscribed
                device.publish(f"{prefix}/m{attempt}/v", json.dumps(attempt))
                rows = await rows_on_stream(nc, subjects, 1, timeout=0.2)
                if rows:
                    break
        assert rows and rows[0].path == "/features/f/properties/v"
        assert isinstance(rows[0], Update)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
    assert proc.returncode == 0, stderr.decode()
    logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "forwarder stopped" for entry in logs)


def test_a_bad_configuration_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mappings:\n  - topic: a/{thing}/b{x}\n")
    done = subprocess.run([*ADAPTER, "mqtt", "--config", str(config)], capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"placeholder must be a whole level" in done.stderr
    done = subprocess.run([*ADAPTER, "mqtt", "--config", str(tmp_path / "missing.yaml")], capture_output=True)
    assert done.returncode == 2


@pytest.mark.parametrize("adapter", ["mqtt", "opcua"])
def test_a_configuration_naming_ingest_partitions_is_refused_with_its_replacement(
    tmp_path: Path, adapter: str
) -> None:
    """An adapter has no database to read the partition count from: a configuration still naming
    the old key must not leave it on a default the server may not share."""
    config = tmp_path / "old.yaml"
    config.write_text("nats_url: nats://127.0.0.1:1\ningest_partitions: 16\n")
    done = subprocess.run([*ADAPTER, adapter, "--config", str(config)], capture_output=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert b"ingest_partitions: replaced by `partitions`" in done.stderr


def test_help_says_the_partition_count_is_the_servers() -> None:
    done = subprocess.run([*ADAPTER, "--help"], capture_output=True, timeout=60, check=True)
    assert b"partitions        twinstore's partition count: must equal the server's" in done.stdout


# An adapter whose clean-up ignores cancellation (as a disconnect waiting on a dead OPC UA server
# can): the stop is bounded by STOP_TIMEOUT all the same, and says so.
_STUCK_ADAPTER = """
import asyncio, sys
import adapters.cli as cli

async def stuck(config):
    print("running", file=sys.stderr, flush=True)  # _serve installed its handlers before this
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", file=sys.stderr, flush=True)

cli.STOP_TIMEOUT = 1.0
cli._runner = lambda adapter: stuck
print("ready", file=sys.stderr, flush=True)
sys.exit(cli.main(["mqtt", "--config", sys.argv[1]]))
"""


def test_a_stop_that_hangs_ends_the_process_after_stop_timeout(tmp_path: Path) -> None:
    config = tmp_path / "adapter.yaml"
    config.write_text("source: stuck\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_ADAPTER, str(config)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.strip() == "running":
                break
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)  # 1 s budget; hangs without the bound
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1, stderr
    assert "cancelled" in stderr
    assert "stop took longer than 1 s" in stderr
