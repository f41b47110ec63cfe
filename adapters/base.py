"""What every adapter shares: configuration files and the store-and-forward publisher.

An adapter turns a plant protocol into :class:`~twinstore.bus.ingest.Update` rows (or Ditto
Protocol commands) and hands them to a :class:`Forwarder`:

* ``send_updates`` numbers them (``Twinstore-Seq``, growing across restarts), writes them to
  the :class:`~adapters.spool.Spool` (fsynced) and returns: from then on they survive a crash.
  When the spool is full it waits for room (backpressure to the source) instead of dropping.
* a background task publishes the spool to JetStream in order, one message at a time, each
  awaited until JetStream acknowledged it, and drops acknowledged messages from the spool.
  When NATS is unreachable it keeps the spool and retries with backoff. A message published
  twice (ack lost, adapter restarted before its commit) carries the same ``Nats-Msg-Id`` and
  seq, so JetStream or the ingest worker drops the copy: nothing lost, nothing applied twice.
* bounds (:mod:`adapters.limits`): ``send_updates`` drops (logs without the value, counts in
  ``dropped_rows``) a row that is too large, too deep or not JSON, and splits batches so that
  every message stays below the NATS server's ``max_payload``. A message NATS refuses for
  good (larger than ``max_payload`` or the stream's maximum message size: spooled before, or by
  a server with a smaller limit) is dropped from the spool, logged and counted in
  ``dropped_messages``, and the messages behind it go on; only errors that may pass (NATS
  away, timeouts, no stream answering) are retried.
* ``desired_changes`` is the other direction: a durable JetStream consumer ``adapter-<source>``
  on the events stream yields the events that change ``desiredProperties`` of the adapter's
  things; :func:`desired_values` flattens one into the values to send to the device.

>>> event = {"topic": "org.acme/pump-1/things/twin/events/merged",
...          "path": "/features/valve/desiredProperties", "value": {"open": True, "pid": {"p": 2}}}
>>> [(d.feature, d.path, d.value) for d in desired_values(event)]
[('valve', '/open', True), ('valve', '/pid/p', 2)]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import yaml
from nats.aio.client import Client as NATS

from adapters import limits
from adapters.spool import Spool, SpoolFullError
from twinstore.bus.connection import servers
from twinstore.bus.ingest import (
    SEQ_HEADER,
    TELEMETRY_FRAME_BYTES,
    EncodedUpdate,
    IngestSubjects,
    OutgoingMessage,
    Update,
    command_message,
    encode_update,
    header_bytes,
    initial_seq,
)
from twinstore.bus.ingest import telemetry_messages as _telemetry_messages
from twinstore.bus.subjects import Subjects
from twinstore.model.partition import DEFAULT_PARTITIONS, MAX_PARTITIONS

__all__ = [
    "ConfigError",
    "DesiredValue",
    "Forwarder",
    "desired_values",
    "forwarder_from_config",
    "load_config",
    "refuse_replaced_keys",
]

log = logging.getLogger("adapters.forwarder")

_DURABLE_INVALID = re.compile(r"[^A-Za-z0-9_-]")
# Room kept for a message's NATS headers (about 130 bytes) when splitting batches by size.
_HEADER_ROOM = 1024
# JetStream's "message size exceeds maximum allowed" (the stream's max_msg_size): never passes.
_JS_MESSAGE_TOO_LARGE = 10054


class ConfigError(ValueError):
    """The adapter configuration is invalid (the message says which key and why)."""


def load_config(path: str | Path) -> dict[str, Any]:
    """Read an adapter configuration: YAML (``.yml``/``.yaml``) or TOML (``.toml``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    elif suffix == ".toml":
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    else:
        raise ConfigError(f"{path}: configuration must be .yml, .yaml or .toml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping at the top level")
    return data


#: The keys :func:`forwarder_from_config` reads (every adapter shares them).
COMMON_KEYS = frozenset(
    {
        "nats_url",
        "nats_prefix",
        "partitions",
        "source",
        "spool_dir",
        "spool_max_bytes",
        "nats",
        "max_row_bytes",
        "max_json_depth",
        "max_message_bytes",
    }
)


def config_int(config: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    """``config[key]`` as an int in ``low..high`` (:class:`ConfigError` naming the key if not)."""
    raw = config.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ConfigError(f"{key}: must be an integer {low}..{high}, not {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}: must be an integer {low}..{high}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be {low}..{high}, not {value}")
    return value


#: Keys an adapter's configuration no longer takes -> what replaces them (refused by name).
REPLACED_KEYS = {"ingest_partitions": "partitions"}


def refuse_replaced_keys(config: dict[str, Any]) -> None:
    """:class:`ConfigError` naming the replacement of a key that was replaced: a forgotten old
    key must not leave the adapter on a default that the server does not share."""
    for old, new in REPLACED_KEYS.items():
        if old in config:
            raise ConfigError(
                f"{old}: replaced by `{new}`, twinstore's one partition count (the server's "
                f"`partitions` setting, the database's; default {DEFAULT_PARTITIONS}): rename the key"
            )


def forwarder_from_config(config: dict[str, Any], default_source: str) -> Forwarder:
    """A :class:`Forwarder` from the keys every adapter shares (:data:`COMMON_KEYS`):
    ``nats_url``, ``nats_prefix``, ``partitions`` (the server's: an adapter has no database to
    read it from; default 64 on both sides), ``source``, ``spool_dir``, ``spool_max_bytes``,
    ``nats`` (extra keyword options of ``nats.connect``, e.g. ``user``, ``password``,
    ``token``) and the bounds ``max_row_bytes``, ``max_json_depth``, ``max_message_bytes``
    (:mod:`adapters.limits`)."""
    refuse_replaced_keys(config)
    source = str(config.get("source", default_source))
    if not source or any(c in source for c in " .*>"):
        raise ConfigError(f"source {source!r}: must be non-empty without spaces, '.', '*' or '>'")
    options = config.get("nats", {})
    if not isinstance(options, dict):
        raise ConfigError("nats: must be a mapping of nats.connect options")
    partitions = config_int(config, "partitions", DEFAULT_PARTITIONS, 1, MAX_PARTITIONS)
    try:
        max_bytes = int(config.get("spool_max_bytes", 1 << 30))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"spool_max_bytes: {exc}") from exc
    message_bytes = config_int(config, "max_message_bytes", limits.MAX_MESSAGE_BYTES, 4096, 64 << 20)
    room = message_bytes - _HEADER_ROOM - TELEMETRY_FRAME_BYTES  # a row must fit in a message
    row_bytes = config_int(config, "max_row_bytes", min(limits.MAX_ROW_BYTES, room), 256, room)
    return Forwarder(
        str(config.get("nats_url", "nats://127.0.0.1:4222")),
        IngestSubjects(str(config.get("nats_prefix", "twinstore")), partitions),
        source,
        Path(str(config.get("spool_dir", f"spool-{source}"))),
        max_bytes,
        nats_options=options,
        max_row_bytes=row_bytes,
        max_json_depth=config_int(config, "max_json_depth", limits.MAX_JSON_DEPTH, 1, 10_000),
        max_message_bytes=message_bytes,
    )


class DesiredValue(msgspec.Struct, frozen=True):
    """One value a device should take: ``features/<feature>/desiredProperties<path>``."""

    thing_id: str
    feature: str
    path: str  # JSON pointer inside desiredProperties, e.g. "/speed" or "/pid/p"
    value: Any


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _leaves(value: Any, pointer: str) -> Iterator[tuple[str, Any]]:
    # Iterative: an event's value comes from outside the adapter and may be deeply nested.
    stack: list[tuple[Any, str]] = [(value, pointer)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict) and item:
            stack.extend((child, f"{where}/{_escape(str(key))}") for key, child in reversed(item.items()))
        elif where and item is not None:  # null in a merge removes: nothing to send
            yield where, item


def desired_values(envelope: dict[str, Any]) -> list[DesiredValue]:
    """The ``desiredProperties`` leaves a thing event sets (empty for any other event)."""
    parts = str(envelope.get("topic", "")).split("/")
    if len(parts) != 6 or parts[2:5] != ["things", "twin", "events"]:
        return []
    if parts[5] not in ("created", "modified", "merged"):
        return []
    thing_id = f"{parts[0]}:{parts[1]}"
    tokens = [_unescape(t) for t in str(envelope.get("path", "/")).split("/")[1:] if t != ""]
    value = envelope.get("value")
    # Lift the value to the thing's root so that one walk handles every path depth.
    for token in reversed(tokens):
        value = {token: value}
    features = value.get("features") if isinstance(value, dict) else None
    if not isinstance(features, dict):
        return []
    found: list[DesiredValue] = []
    for feature, body in features.items():
        desired = body.get("desiredProperties") if isinstance(body, dict) else None
        if desired is None:
            continue
        found.extend(DesiredValue(thing_id, feature, p, v) for p, v in _leaves(desired, ""))
    return found


class Forwarder:
    """Store-and-forward publisher of one source; see the module docstring."""

    def __init__(
        self,
        nats_url: str,
        subjects: IngestSubjects,
        source: str,
        spool_dir: Path,
        spool_max_bytes: int,
        *,
        nats_options: dict[str, Any] | None = None,
        publish_batch: int = 256,
        ack_timeout: float = 5.0,
        max_backoff: float = 5.0,
        max_row_bytes: int = limits.MAX_ROW_BYTES,
        max_json_depth: int = limits.MAX_JSON_DEPTH,
        max_message_bytes: int = limits.MAX_MESSAGE_BYTES,
    ) -> None:
        self.nats_url = nats_url
        self.subjects = subjects
        self.source = source
        self.spool_dir = Path(spool_dir)
        self.spool_max_bytes = spool_max_bytes
        self.nats_options = dict(nats_options or {})
        self.publish_batch = publish_batch
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        self.max_row_bytes = max_row_bytes
        self.max_json_depth = max_json_depth
        self.max_message_bytes = max_message_bytes
        self.published = 0  # messages acknowledged by JetStream (this process)
        self.spooled = 0  # messages written to the spool (this process)
        self.updates = 0  # rows handed to send_updates
        self.dropped_rows: Counter[str] = Counter()  # rows not spooled, by reason (adapters.limits)
        self.dropped_messages = 0  # spooled messages NATS refused for good, dropped
        self._server_max_payload: int | None = None  # learnt at connect
        self._spool: Spool | None = None
        self._nc: NATS | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()  # something was spooled
        self._room = asyncio.Event()  # something was committed
        self._seq_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("Forwarder.start() was not called")
        return self._spool

    @property
    def pending(self) -> int:
        """Messages in the spool not yet acknowledged by JetStream (across restarts)."""
        return self._spool.pending if self._spool is not None else 0

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        """Open the spool (resuming what a previous run left) and start publishing in the
        background; returns at once, also when NATS is unreachable."""
        if self._task is not None:
            return
        self._spool = await asyncio.to_thread(Spool, self.spool_dir, self.spool_max_bytes)
        if self._spool.pending:
            log.info(
                "resuming spool",
                extra={"source": self.source, "pending": self._spool.pending, "spool": str(self.spool_dir)},
            )
        self._task = asyncio.create_task(self._run(), name=f"forwarder-{self.source}")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Publish what can be published within ``flush_timeout`` seconds, then close; what is
        left stays in the spool for the next start."""
        if self._task is None:
            return
        if self.connected:
            deadline = asyncio.get_running_loop().time() + flush_timeout
            while self.pending and asyncio.get_running_loop().time() < deadline and not self._task.done():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.1)
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)
            self._nc = None
        self._connected.clear()
        log.info(
            "forwarder stopped",
            extra={
                "source": self.source,
                "published": self.published,
                "pending": self.pending,
                "dropped_rows": sum(self.dropped_rows.values()),
                "dropped_messages": self.dropped_messages,
            },
        )
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # -- sending -------------------------------------------------------------------------------

    @property
    def message_bytes(self) -> int:
        """Payload bytes a message may have: ``max_message_bytes``, or the server's
        ``max_payload`` when smaller, less room for the headers."""
        limit = self.max_message_bytes
        if self._server_max_payload is not None:
            limit = min(limit, self._server_max_payload)
        return limit - _HEADER_ROOM

    async def send_updates(self, updates: list[Update]) -> None:
        """Number ``updates`` (telemetry messages per partition, each below
        :attr:`message_bytes`), spool them durably and return; published in the background.
        A row that cannot be sent (see the module docstring) is dropped and counted."""
        if not updates:
            return
        rows = self._checked(updates)
        self.updates += len(updates)
        if not rows:
            return
        async with self._seq_lock:
            first = initial_seq(self.spool.last_seq)
            await self._append(
                _telemetry_messages(self.subjects, self.source, first, rows, max_bytes=self.message_bytes)
            )

    def _checked(self, updates: list[Update]) -> list[EncodedUpdate]:
        """The rows that can be sent, each encoded once; the others logged and counted."""
        rows: list[EncodedUpdate] = []
        most = min(self.max_row_bytes, self.message_bytes - TELEMETRY_FRAME_BYTES)
        depth, problem_of, keep = self.max_json_depth, limits.value_problem, rows.append
        for update in updates:
            problem = problem_of(update.value, depth)
            if problem is None:
                try:
                    encoded = encode_update(update)
                except (TypeError, ValueError, OverflowError):  # UnicodeEncodeError: a lone surrogate
                    problem = limits.NOT_JSON
                else:
                    if len(encoded[1]) <= most:
                        keep(encoded)
                        continue
                    problem = limits.TOO_LARGE
            self.dropped_rows[problem] += 1
            log.warning(
                "row dropped: %s",
                problem,
                extra={
                    "source": self.source,
                    "thing_id": str(update.thing_id)[:300],
                    "path": str(update.path)[:300],
                    "max_row_bytes": most,
                    "max_json_depth": self.max_json_depth,
                    "dropped_rows": sum(self.dropped_rows.values()),
                },
            )
        return rows

    async def send_command(self, envelope: dict[str, Any]) -> None:
        """Spool one Ditto Protocol command envelope durably and return (published in order
        with the telemetry of this source); ``ValueError`` if it is larger than a message may
        be (:attr:`message_bytes`)."""
        async with self._seq_lock:
            seq = initial_seq(self.spool.last_seq)
            message = command_message(self.subjects, self.source, seq, envelope)
            if len(message.payload) > self.message_bytes:
                raise ValueError(
                    f"command envelope of {len(message.payload)} bytes: more than {self.message_bytes}"
                )
            await self._append([message])

    async def _append(self, messages: list[OutgoingMessage]) -> None:
        warned = False
        while True:
            self._room.clear()
            try:
                await self.spool.append(messages)
                break
            except SpoolFullError:
                if self.spool.pending == 0:
                    raise  # larger than the whole spool: waiting would never help
                if not warned:
                    log.warning(
                        "spool full; holding the source until NATS takes messages",
                        extra={"source": self.source, "pending": self.spool.pending},
                    )
                    warned = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 1.0)
        self.spooled += len(messages)
        self._wake.set()

    # -- publishing ----------------------------------------------------------------------------

    async def _connection(self) -> NATS:
        """The connection, once connected (opened by the publishing task)."""
        while True:
            await self._connected.wait()
            if self._nc is not None:
                return self._nc

    async def _open(self) -> NATS:
        async def disconnected() -> None:
            if self._task is None:  # stopping
                return
            log.warning("NATS disconnected; spooling", extra={"source": self.source})

        async def reconnected() -> None:
            log.info("NATS reconnected", extra={"source": self.source, "pending": self.pending})
            self._wake.set()

        async def error(exc: Exception) -> None:
            log.debug("NATS: %s", exc, extra={"source": self.source})

        options: dict[str, Any] = {
            "name": f"twinstore-adapter-{self.source}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # also keeps the first connect trying
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            **self.nats_options,
        }
        nc = await nats.connect(servers(self.nats_url), **options)
        log.info("NATS connected", extra={"source": self.source, "pending": self.pending})
        return nc

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._nc is None or self._nc.is_closed:
                    self._connected.clear()
                    self._nc = await self._open()
                    self._connected.set()
                self._server_max_payload = self._nc.max_payload
                js = self._nc.jetstream()
                while True:
                    self._wake.clear()  # before peeking: an append after this wakes us
                    batch = self.spool.peek(self.publish_batch)
                    if not batch:
                        await self._wake.wait()
                        continue
                    await self._publish(js, batch)
                    backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "publishing failed; retrying in %.2fs: %s",
                    backoff,
                    exc or type(exc).__name__,
                    extra={"source": self.source, "pending": self.pending},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _publish(self, js: nats.js.JetStreamContext, batch: list[OutgoingMessage]) -> None:
        """Publish in order, each awaited until acknowledged; commit what was acknowledged or
        refused for good (also when a later one fails: the next round starts with it)."""
        done = 0
        try:
            for message in batch:
                size = len(message.payload) + header_bytes(message.headers)
                max_payload = self._server_max_payload
                if max_payload is not None and size > max_payload:
                    # Checked here: the server would close the connection (headers count too),
                    # and the same message would be refused again after every reconnect.
                    self._dropped(message, f"larger than the NATS server's max_payload ({max_payload})")
                    done += 1
                    continue
                try:
                    await js.publish(
                        message.subject, message.payload, timeout=self.ack_timeout, headers=message.headers
                    )
                except nats.errors.MaxPayloadError:
                    self._dropped(message, "larger than the NATS server's max_payload")
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _JS_MESSAGE_TOO_LARGE:
                        raise
                    self._dropped(message, "larger than the stream's maximum message size")
                else:
                    self.published += 1
                done += 1
        finally:
            if done:
                await asyncio.to_thread(self.spool.commit, done)
                self._room.set()

    def _dropped(self, message: OutgoingMessage, why: str) -> None:
        self.dropped_messages += 1
        log.warning(
            "message dropped from the spool: %s",
            why,
            extra={
                "source": self.source,
                "seq": message.headers.get(SEQ_HEADER),
                "subject": message.subject,
                "bytes": len(message.payload),
                "dropped_messages": self.dropped_messages,
            },
        )

    # -- the other direction -------------------------------------------------------------------

    async def desired_changes(self, thing_ids: set[str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the thing events (Ditto Protocol envelopes) that change ``desiredProperties``
        of ``thing_ids`` (all things if None), in event order per thing; each is acknowledged
        when the caller asks for the next one (so a crash while handling it redelivers it).

        The durable consumer ``adapter-<source>`` starts with the events published after its
        creation and resumes where it was after a restart."""
        events = Subjects(self.subjects.prefix, self.subjects.partitions)
        durable = "adapter-" + _DURABLE_INVALID.sub("_", self.source)
        config = nats.js.api.ConsumerConfig(
            durable_name=durable,
            deliver_policy=nats.js.api.DeliverPolicy.NEW,
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=1000,
            filter_subject=events.events_wildcard,
        )
        backoff = 0.1
        while True:
            try:
                nc = await self._connection()
                js = nc.jetstream()
                sub = await js.pull_subscribe(
                    events.events_wildcard, durable=durable, stream=events.events_stream, config=config
                )
                try:
                    while True:
                        try:
                            messages = await sub.fetch(100, timeout=1.0)
                        except nats.errors.TimeoutError:
                            continue
                        backoff = 0.1
                        for msg in messages:
                            envelope = _decode_event(msg.data)
                            if envelope is not None and _wanted(envelope, thing_ids):
                                yield envelope
                            await msg.ack()
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning(
                    "desired-changes consumer failed; retrying in %.1fs: %s",
                    backoff,
                    exc or type(exc).__name__,
                    extra={"source": self.source},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)


_decode_json = msgspec.json.Decoder(dict[str, Any]).decode


def _decode_event(data: bytes) -> dict[str, Any] | None:
    try:
        return _decode_json(data)
    except (msgspec.DecodeError, RecursionError):  # msgspec recurses per nesting level
        log.warning("undecodable event skipped")
        return None


def _wanted(envelope: dict[str, Any], thing_ids: set[str] | None) -> bool:
    parts = str(envelope.get("topic", "")).split("/")
    if len(parts) < 2 or (thing_ids is not None and f"{parts[0]}:{parts[1]}" not in thing_ids):
        return False
    return bool(desired_values(envelope))
