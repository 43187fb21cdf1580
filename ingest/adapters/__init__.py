"""One adapter per vendor payload format; the registry says which vendor a sensor speaks."""

from __future__ import annotations

from ingest.adapters.base import Adapter, Reject, Row
from ingest.adapters.compact import Compact
from ingest.adapters.guardeye import GuardEye
from ingest.adapters.mekongflow import MekongFlow
from ingest.adapters.probenet import ProbeNet
from ingest.adapters.safecity import SafeCity
from ingest.adapters.saomai import Saomai
from ingest.adapters.visitcount import VisitCount


def all_adapters() -> dict[str, Adapter]:
    """A fresh adapter per vendor name (adapters hold their own msgspec decoders)."""
    return {a.vendor: a for a in (Saomai(), MekongFlow(), Compact(), GuardEye(), SafeCity(),
                                  VisitCount(), ProbeNet())}


__all__ = ["Adapter", "Reject", "Row", "all_adapters"]
