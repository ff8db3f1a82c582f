"""The one child-process helper of the decoder child and the tensor-parallel ranks, on a real
child (tests/helpers/child_echo.py): spawn with the repo on PYTHONPATH, framed messages, deadlines,
a dead child's signal, several children under one deadline."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io.child_process import Child, child_env, how_it_ended, receive_any, stop_all

REPO = Path(__file__).resolve().parents[1]
SLOW_START_S = 120  # a Python start on a loaded machine


def started(tag: str = "") -> Child:
    child = Child("tests.helpers.child_echo", {"CHILD_ECHO_TAG": tag})
    assert child.read_message(time.monotonic() + SLOW_START_S) == ("ready", tag)
    return child


def test_children_import_this_checkout_from_any_folder(tmp_path):
    assert child_env()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    # a child started elsewhere (a Ray worker's folder) imports this checkout's pipeline
    out = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=tmp_path,
                         env=child_env(), capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).resolve() == REPO / "pipeline" / "__init__.py"


def test_messages_large_and_small_come_back_whole_and_in_order():
    child = started("a")
    try:
        big = os.urandom(5 * 2**20)  # many pipe reads
        child.send(("echo", big))
        assert child.read_message(time.monotonic() + SLOW_START_S) == ("ok", big)
        for payload in (1, "x" * 10, big[:1000]):  # replies that may arrive in one read
            child.send(("echo", payload))
        time.sleep(0.5)
        got = [child.read_message(time.monotonic() + SLOW_START_S) for _ in range(3)]
        assert got == [("ok", 1), ("ok", "x" * 10), ("ok", big[:1000])]
    finally:
        assert child.stop() == -signal.SIGKILL


def test_a_reply_past_the_deadline_raises_timeout_and_a_dead_child_says_its_signal():
    child = started()
    try:
        child.send(("sleep", 30))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            child.read_message(time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 10
    finally:
        child.stop()
    assert child.poll() is not None and child.proc.stdout.closed
    child = started()
    child.send(("die", signal.SIGSEGV))
    assert child.read_message(time.monotonic() + SLOW_START_S) is None  # its stdout closed
    assert how_it_ended(child.stop(grace_s=30)) == "signal SIGSEGV"  # its own end, not our kill
    assert how_it_ended(None) == "still running" and how_it_ended(3) == "exit code 3"


def test_several_children_under_one_deadline():
    children = [started(str(i)) for i in range(3)]
    try:
        children[0].send(("sleep", 30))
        children[1].send(("echo", "one"))
        children[2].send(("sleep", 0.2))
        deadline = time.monotonic() + SLOW_START_S
        first = receive_any(children, deadline)
        second = receive_any([c for c in children if c is not first[0]], deadline)
        assert {(children.index(c), m) for c, m in (first, second)} == {(1, ("ok", "one")), (2, ("ok", 0.2))}
        with pytest.raises(TimeoutError):  # the sleeper holds the others' deadline to nothing more
            receive_any(children, time.monotonic() + 0.5)
        children[1].send(("die", signal.SIGKILL))
        child, message = receive_any(children, time.monotonic() + SLOW_START_S)
        assert (child, message) == (children[1], None)
    finally:
        stop_all(children)
    assert all(c.poll() is not None for c in children)
