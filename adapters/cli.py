"""``twinstore-adapter``: run a protocol adapter as its own process.

``twinstore-adapter mqtt --config FILE`` or ``twinstore-adapter opcua --config FILE``; each
adapter module has ``async def run(config: dict) -> None`` which runs until cancelled and
cleans up in ``finally`` (SIGTERM and SIGINT cancel it: the spool is flushed as far as NATS
takes it, the rest stays on disk for the next start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import yaml

from adapters.base import ConfigError, load_config
from twinstore import logs

__all__ = ["main"]

log = logging.getLogger("adapters")

DESCRIPTION = """\
twinstore-adapter: feed twins from plant protocols through NATS JetStream.

An adapter reads its configuration file (YAML .yml/.yaml or TOML .toml), subscribes to the
plant (MQTT broker with plain topics and Sparkplug B, or OPC UA server), and publishes every
value to twinstore's ingest stream. Values are written to a local spool (fsynced) first, so
nothing is lost while NATS is unreachable or the adapter restarts; they are published in order
when NATS is back. Changes of desiredProperties of the mapped things are sent to the devices
(MQTT command topics, Sparkplug NCMD/DCMD, OPC UA writes).

Common configuration keys (adapter-specific ones: see the README):
  nats_url          NATS server (default nats://127.0.0.1:4222)
  nats_prefix       twinstore's nats_prefix (default twinstore)
  partitions        twinstore's partition count: must equal the server's `partitions` (the
                    database's; default 64 on both sides). An adapter has no database to read
                    it from: with another count its rows go to other subjects, where they
                    are refused (ingest:thing.wrongPartition) or, past the stream's last
                    subject, stay unpublished in the spool
  source            this adapter's source name (Nats-Msg-Id, Twinstore-Source; unique per adapter)
  spool_dir         spool directory (default ./spool-<source>)
  spool_max_bytes   spool bound in bytes (default 1 GiB); when full the source is held back

Logs are JSON lines on stderr (--log-format text for plain lines). SIGTERM stops gracefully.
"""


def configure_logging(level: str, fmt: str) -> None:
    """twinstore's logging set-up (one place), with the adapters' chatty libraries quieter."""
    logs.configure_logging(level, fmt, quiet=("asyncua", "nats"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinstore-adapter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="adapter", required=True, metavar="ADAPTER")
    for name, help_text in (
        ("mqtt", "MQTT 3.1.1/5 topics and Sparkplug B to twins, desired values to command topics"),
        ("opcua", "OPC UA subscriptions to twins, desired values as OPC UA writes"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", metavar="FILE", required=True, help="YAML or TOML configuration")
        cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        cmd.add_argument("--log-format", default="json", choices=["json", "text"])
    return parser


def _runner(adapter: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
    # Imported lazily: the OPC UA adapter pulls in asyncua, the MQTT one paho and protobuf.
    module = importlib.import_module(f"adapters.{adapter}")
    return cast(Callable[[dict[str, Any]], Awaitable[None]], module.run)


# A stop (SIGTERM/SIGINT) flushes for at most this long in all: flushing the batcher, the OPC UA
# disconnect, publishing the spool and closing NATS each have their own bound, but together,
# on a loaded machine and with the plant gone, they could outlast a supervisor's patience
# (Kubernetes' grace period, a parent's kill). Rows not published stay in the fsynced spool.
STOP_TIMEOUT = 10.0


async def _serve(adapter: str, config: dict[str, Any]) -> bool:
    """Run the adapter until it ends or a signal stops it; False when its stop outlasted
    ``STOP_TIMEOUT`` (or left tasks behind that would not end), so the caller exits at once."""
    task = asyncio.ensure_future(_runner(adapter)(config))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    signalled = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not task.done():
            log.error(
                "stop took longer than %.0f s; exiting (unpublished rows stay in the spool)",
                STOP_TIMEOUT,
                extra={"adapter": adapter},
            )
            return False
        if task.cancelled():
            log.info("stopped", extra={"adapter": adapter})
        else:
            task.result()  # the adapter's own error (e.g. ConfigError) reaches main
        # What a stop abandons (a disconnect still waiting for a dead server) must not keep
        # the process alive: asyncio.run would wait for it without a bound.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for other in others:
            other.cancel()
        if others:
            _, pending = await asyncio.wait(others, timeout=1.0)
            return not pending
        return True
    finally:
        signalled.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.error("cannot read configuration: %s", exc)
        return 2
    log.info("starting", extra={"adapter": args.adapter, "config": args.config})
    try:
        clean = _run_bounded(_serve(args.adapter, config))
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc, extra={"adapter": args.adapter})
        return 2
    if not clean:
        logging.shutdown()
        os._exit(1)  # leftover tasks or threads (asyncua, nats) must not hold the process
    return 0


def _run_bounded(main_coro: Coroutine[Any, Any, bool]) -> bool:
    """``asyncio.run`` without its unbounded wait for tasks left behind: those were already
    given their second in ``_serve``; here the loop is closed whatever they do."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main_coro)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not leftovers:
            loop.close()


if __name__ == "__main__":
    sys.exit(main())
