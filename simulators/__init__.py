"""Simulated Can Tho sensor fleet: behaviour, vendor payloads, scenarios, MQTT publisher.

``from simulators import Simulation`` (see ``simulators.simulation``); the command line is
``cityops simulate`` (``simulators.cli``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulators.simulation import Sent, Simulation

__all__ = ["Sent", "Simulation"]


def __getattr__(name: str) -> Any:
    # Lazy, so `cityops --help` does not import numpy.
    if name in __all__:
        from simulators import simulation

        return getattr(simulation, name)
    raise AttributeError(name)
