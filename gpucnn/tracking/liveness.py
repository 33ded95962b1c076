"""Which process a run belongs to, and whether that process still lives.

A run records its host, process id and the process's start time, and on Linux the
machine's id with the process's pid namespace (containers, or machines, can share a
host name). A process id alone is not enough: after a process dies the system can give
its id to another. On Linux the start time is the process's start in clock ticks since
boot, with the boot's id, read from /proc; on other POSIX systems only the id is
checked; on Windows a run's process is never judged dead.
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
    machine: str = ""  # "<machine id>:<pid namespace>", or "" where /proc does not tell

    def as_tags(self) -> dict[str, str]:
        return {
            "gpucnn.host": self.host,
            "gpucnn.pid": str(self.pid),
            "gpucnn.started": self.start,
            "gpucnn.machine": self.machine,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ProcessIdentity | None:
        try:
            pid = int(tags["gpucnn.pid"])
            host = tags["gpucnn.host"]
        except (KeyError, ValueError):
            return None
        return cls(host, pid, tags.get("gpucnn.started", ""), tags.get("gpucnn.machine", ""))

    def same_machine(self, other: ProcessIdentity) -> bool:
        """Whether both processes' ids name processes of one machine and pid namespace:
        two containers, or two machines, can share a host name but not these."""
        if self.host != other.host:
            return False
        return not (self.machine and other.machine) or self.machine == other.machine


def this_process() -> ProcessIdentity:
    pid = os.getpid()
    return ProcessIdentity(socket.gethostname(), pid, process_start(pid), _machine())


def _machine() -> str:
    """This machine's id and this process's pid namespace, where Linux tells them."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
        namespace = os.stat(PROC / "self" / "ns" / "pid").st_ino
    except OSError:
        return ""
    return f"{machine}:{namespace}"


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
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process on Windows: never judge there
    try:
        os.kill(process.pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
