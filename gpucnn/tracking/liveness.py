"""Which process a run belongs to, and whether that process still lives.

A run records its host, process id and the process's start time. A process id alone is
not enough: after a process dies the system can give its id to another. On Linux the
start time is the process's start in clock ticks since boot, with the boot's id, read
from /proc; elsewhere only the id is checked, and the docs say so.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    start: str  # "<boot id>:<start ticks>", or "" where /proc does not tell

    def as_tags(self) -> dict[str, str]:
        return {"gpucnn.host": self.host, "gpucnn.pid": str(self.pid), "gpucnn.started": self.start}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ProcessIdentity | None:
        try:
            return cls(tags["gpucnn.host"], int(tags["gpucnn.pid"]), tags.get("gpucnn.started", ""))
        except (KeyError, ValueError):
            return None


def this_process() -> ProcessIdentity:
    return ProcessIdentity(socket.gethostname(), os.getpid(), process_start(os.getpid()))


def process_start(pid: int) -> str:
    """``"<boot id>:<start ticks>"`` of process ``pid``, or "" where it cannot be read."""
    try:
        boot = (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{boot}:{fields[19]}"  # field 22, the start time in clock ticks since boot


def is_alive(process: ProcessIdentity) -> bool:
    """Whether ``process`` (on this host) still runs: its id exists and, where the start
    time was recorded, the process with that id started then."""
    if process.start and PROC.is_dir():
        return process_start(process.pid) == process.start
    try:
        os.kill(process.pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
