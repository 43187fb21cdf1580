"""Sampling profiles of the running services during a bench step (py-spy).

Why: the bench says how much CPU each service spends per reading; a profile says on
what. ``py-spy record --nonblocking`` samples a process from outside (no pause, no code
change) and writes collapsed stacks; ``summary`` turns them into the functions that hold
the most samples, by self time (where the CPU is) and by inclusive time (which part of
the pipeline it belongs to). The raw stacks are kept in ``profiles/`` beside the results
(not in git: ~0.5 MB a run), for a flamegraph (``flamegraph.pl`` or speedscope read them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
#: Frames of the event loop and of the interpreter's machinery, not of our code.
_PLUMBING = ("asyncio/", "selectors.py", "threading.py", "runpy.py", "<frozen ")


def py_spy() -> str | None:
    """The py-spy executable (the project's dev extra installs it), if there is one."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def recording(pids: dict[str, Callable[[], int | None]], names: list[str], seconds: float,
              out_dir: Path, tag: str) -> Iterator[dict[str, Path]]:
    """Record ``names`` (keys of ``pids``) for ``seconds`` while the block runs; yields
    service -> collapsed-stack file (filled once the block has ended)."""
    exe = py_spy()
    files: dict[str, Path] = {}
    procs: list[subprocess.Popen[bytes]] = []
    if exe is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            pid = pids[name]()
            if pid is None:
                continue
            path = out_dir / f"profile-{tag}-{name}.txt"
            files[name] = path
            procs.append(subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                 "--rate", "100", "--nonblocking", "--format", "raw", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield files
    finally:
        for p in procs:
            try:
                p.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()


def _frame(text: str) -> str:
    """``function (file:line)`` -> ``function (file)``: lines of one function add up."""
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip()
    file = m.group("file")
    for marker in ("site-packages/", "python3.11/", "/work/", "/tmp/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('fn')} ({file})"


def summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Samples, and the ``top`` functions by self and by inclusive share of samples."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle = total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        # py-spy --idle is off: a sample is a thread on CPU. A poll in the selector is
        # the loop waiting (rarely sampled without --idle, counted apart when it is).
        if any("select (" in f or "poll (" in f for f in frames[-1:]):
            idle += n
        self_time[frames[-1]] += n
        for f in set(frames):
            if not any(p in f for p in _PLUMBING):
                inclusive[f] += n
    if not total:
        return {"samples": 0}

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(n / total, 3)) for f, n in c.most_common(top)]

    return {"samples": total, "waiting_share": round(idle / total, 3),
            "self": share(self_time), "inclusive": share(inclusive)}
