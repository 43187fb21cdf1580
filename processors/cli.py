"""``cityops process``: the processors' subcommand (see ``processors.service``)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging

from cityops.settings import Settings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["auto", "timescale", "postgres"], default=None,
                        help="storage mode (default: settings.storage_mode)")
    parser.add_argument("--group", default=None,
                        help="Kafka consumer group (default: settings.process_group)")
    parser.add_argument("--instance", default=None,
                        help="static group member id, unique per processor "
                             "(default: settings.process_instance_id)")


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the kernel.

    Every numpy temporary of a batch is larger than glibc's mmap threshold, so by
    default each is mmap'ed, page-faulted in and unmapped again: per batch that costs
    more than the aggregation itself. Raising the mmap and trim thresholds keeps the
    memory in the process for the next batch (numbers in bench/aggregate.py).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cityops.service import install_stop_signals
    from processors.service import serve

    changes = {}
    if getattr(args, "mode", None):
        changes["storage_mode"] = args.mode
    if getattr(args, "group", None):
        changes["process_group"] = args.group
    if getattr(args, "instance", None) is not None:
        changes["process_instance_id"] = args.instance
    if changes:
        settings = settings.replace(**changes)
    keep_freed_memory()

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        return await serve(settings, stop)

    return asyncio.run(main())
