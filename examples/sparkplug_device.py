"""A Sparkplug B edge node publishing over MQTT; the twinstore MQTT adapter turns it into a twin.

The edge node ``<group>/<node>`` is the thing ``<namespace>:<group>.<node>`` (adapter setting
``sparkplug.namespace``). It announces itself with NBIRTH (every metric, with an alias), then
sends NDATA by alias; BIRTH sets ``features/connectivity/properties/status`` to "online", and a
metric ``Pump/Flow`` becomes ``features/Pump/properties/Flow``. Payloads are Sparkplug B
protobuf (the schema's generated code ships in ``adapters.sparkplug``). The twin must exist
(create it over HTTP, e.g. with ``{"features": {}}``) and the adapter's source may write it.

    .venv/bin/python examples/sparkplug_device.py --mqtt-host 127.0.0.1 --group plant --node edge-1
"""

from __future__ import annotations

import argparse
import math
import time

import paho.mqtt.client as mqtt

from adapters.sparkplug.sparkplug_b_pb2 import Payload

FLOAT, DOUBLE, INT64 = 9, 10, 4  # Sparkplug B datatypes


def birth(bd_seq: int) -> bytes:
    payload = Payload(timestamp=int(time.time() * 1000), seq=0)
    payload.metrics.add(name="bdSeq", datatype=INT64, long_value=bd_seq)
    payload.metrics.add(name="Pump/Flow", alias=1, datatype=DOUBLE, double_value=12.0)
    payload.metrics.add(name="Pump/Pressure", alias=2, datatype=FLOAT, float_value=2.1)
    return payload.SerializeToString()


def data(seq: int, i: int) -> bytes:
    payload = Payload(timestamp=int(time.time() * 1000), seq=seq)
    payload.metrics.add(alias=1, datatype=DOUBLE, double_value=round(12 + math.sin(i / 3), 3))
    payload.metrics.add(alias=2, datatype=FLOAT, float_value=2 + 0.1 * math.cos(i / 3))
    return payload.SerializeToString()


def main(host: str, port: int, group: str, node: str, count: int) -> None:
    bd_seq = 0
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{group}-{node}")
    # The broker publishes the node's death for it if the connection drops.
    death = Payload(timestamp=int(time.time() * 1000))
    death.metrics.add(name="bdSeq", datatype=INT64, long_value=bd_seq)
    client.will_set(f"spBv1.0/{group}/NDEATH/{node}", death.SerializeToString(), qos=1)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(f"spBv1.0/{group}/NBIRTH/{node}", birth(bd_seq), qos=1).wait_for_publish(5)
        print(f"NBIRTH {group}/{node}")
        for i in range(1, count + 1):
            client.publish(f"spBv1.0/{group}/NDATA/{node}", data(i % 256, i), qos=1).wait_for_publish(5)
            print(f"NDATA seq {i % 256}")
            time.sleep(0.1)
    finally:
        client.loop_stop()
        client.disconnect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--group", default="plant")
    parser.add_argument("--node", default="edge-1")
    parser.add_argument("--count", type=int, default=10)
    a = parser.parse_args()
    main(a.mqtt_host, a.mqtt_port, a.group, a.node, a.count)
