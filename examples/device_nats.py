"""A device (or gateway) publishing telemetry to twinstore over NATS JetStream.

Each message is a batch of rows ``[thingId, path, value, sourceTimestampMs, quality]`` on the
ingest partition of the thing (``crc32(thingId) % partitions``, the server's partition count:
its ``partitions`` setting, 64 unless set); ``Twinstore-Seq`` grows with every message of the
source, and ``Nats-Msg-Id`` makes a republish a duplicate. Only nats-py is needed; the source's
subjects must be allowed to write the thing by its policy (``ingest_sources`` /
``ingest_default_subjects``).

    .venv/bin/python examples/device_nats.py --nats-url nats://127.0.0.1:4222 --source plc-1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import zlib

import nats


async def main(nats_url: str, prefix: str, partitions: int, source: str, thing_id: str, count: int) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subject = f"{prefix}.ingest.{zlib.crc32(thing_id.encode()) % partitions}"
    first_seq = time.time_ns() // 1000  # grows across restarts of this program
    try:
        for i in range(count):
            seq = first_seq + i
            now_ms = int(time.time() * 1000)
            rows = [
                [thing_id, "/features/flow/properties/rate", round(12 + math.sin(i / 5), 3), now_ms, "Good"],
                [
                    thing_id,
                    "/features/flow/properties/pressure",
                    round(2 + 0.1 * math.cos(i / 5), 3),
                    now_ms,
                    "Good",
                ],
            ]
            ack = await js.publish(
                subject,
                json.dumps({"updates": rows}).encode(),
                headers={
                    "Twinstore-Source": source,
                    "Twinstore-Seq": str(seq),
                    "Nats-Msg-Id": f"{source}:{seq}",
                    "Content-Type": "application/vnd.twinstore.telemetry+json",
                },
            )
            print(f"published seq {seq} to {subject} (stream sequence {ack.seq})")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="twinstore", help="nats_prefix of the server")
    parser.add_argument(
        "--partitions", type=int, default=64, help="the server's partition count (its `partitions`, 64)"
    )
    parser.add_argument("--source", default="plc-1")
    parser.add_argument("--thing", default="org.acme:pump-1")
    parser.add_argument("--count", type=int, default=10)
    a = parser.parse_args()
    asyncio.run(main(a.nats_url, a.prefix, a.partitions, a.source, a.thing, a.count))
