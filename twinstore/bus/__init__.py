"""NATS: streams, subjects, the relay, partitions, ingest's wire format.

Importing it makes nats-py parse message headers with :func:`twinstore.bus.nats_headers.parse`
(the same result, several times faster: see that module).
"""

from twinstore.bus import nats_headers

nats_headers.install()
