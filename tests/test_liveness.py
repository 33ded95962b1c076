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


def test_two_containers_or_machines_sharing_a_host_name_are_not_the_same_machine():
    me = this_process()
    twin = dataclasses.replace(me, machine="another-machine:4026531836")
    assert me.same_machine(me)
    assert not me.same_machine(twin) and not twin.same_machine(me)
    assert not me.same_machine(dataclasses.replace(me, host="elsewhere"))
    unknown = dataclasses.replace(me, machine="")  # an older run, or no /proc: host decides
    assert me.same_machine(unknown)
    assert ProcessIdentity.from_tags(me.as_tags()).machine == me.machine
