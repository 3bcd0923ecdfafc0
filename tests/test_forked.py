"""forked.Child: work done in a forked child comes back as futures (pure, no database)."""

from __future__ import annotations

import os
import signal

import pytest

from cr_queue import forked


def test_results_exceptions_and_the_message_come_back_per_item():
    def work(item, message):
        if item == "boom":
            raise ValueError(f"bad item {item}")
        return (item.upper(), message()["suffix"], os.getpid())

    child = forked.Child([(0, "a"), (2, "boom"), (4, "c")], work, threads=2)
    try:
        child.send({"suffix": "!"})
        first, third = child.futures[0].result(timeout=30), child.futures[4].result(timeout=30)
        assert first[:2] == ("A", "!") and third[:2] == ("C", "!")
        assert first[2] == third[2] == child.pid != os.getpid(), "the work ran in the child"
        with pytest.raises(ValueError, match="bad item boom"):
            child.futures[2].result(timeout=30)
    finally:
        child.close()
    assert child.wait() == 0


def test_an_exception_that_does_not_pickle_arrives_as_its_type_and_message():
    class Local(Exception):  # defined in a function: pickle cannot find it
        pass

    def work(item, message):
        raise Local("not picklable here")

    child = forked.Child([(0, "x")], work, threads=1)
    try:
        with pytest.raises(RuntimeError, match="Local: not picklable here"):
            child.futures[0].result(timeout=30)
    finally:
        child.close()


def test_a_killed_child_fails_what_it_had_not_reported():
    def work(item, message):
        return message()  # blocks: the parent never sends

    child = forked.Child([(0, "x"), (1, "y")], work, threads=2)
    child.kill()
    for future in child.futures.values():
        with pytest.raises(forked.ChildDied, match=f"signal {signal.SIGKILL}"):
            future.result(timeout=30)
    child.close()


def test_the_child_ends_when_the_parent_sends_nothing_and_closes():
    def work(item, message):
        return message()

    child = forked.Child([(0, "x")], work, threads=1)
    child.close()
    with pytest.raises(forked.ChildDied, match="sent nothing"):
        child.futures[0].result(timeout=30)
