"""A run's process: alive, gone, or its id reused by another process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from gpucnn.tracking.liveness import PROC, ProcessIdentity, is_alive, this_process


def test_this_process_is_alive_and_round_trips_through_tags():
    me = this_process()
    assert is_alive(me)
    assert ProcessIdentity.from_tags(me.as_tags()) == me
    assert ProcessIdentity.from_tags({"gpucnn.host": "h"}) is None  # no pid: not ours to judge


def test_a_process_that_ended_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = dataclasses.replace(this_process(), pid=child.pid, start="")
    assert not is_alive(gone)


def test_a_reused_process_id_is_not_the_runs_process():
    """Same id, another start time: where /proc tells start times, it is not the run's."""
    me = this_process()
    if not (PROC.is_dir() and me.start):
        return  # no start times here: only the id is checked (the docs say so)
    boot, ticks = me.start.rsplit(":", 1)
    assert not is_alive(dataclasses.replace(me, start=f"{boot}:{int(ticks) + 1}"))
    assert not is_alive(dataclasses.replace(me, start=f"another-boot:{ticks}"))
