"""job.signals.StopSignal in this process, with real signals sent to it: the first SIGTERM or SIGINT asks for a clean
stop (a flag, its name, one line on stderr), a second one abandons the run; without a signal nothing is asked.
The process's own handlers are put back after each test."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from job.signals import StopSignal

BOUND_S = 30.0  # a handler runs in the main thread as soon as the signal is delivered; this only bounds a failure


@pytest.fixture
def own_handlers():
    """Restores the SIGINT and SIGTERM handlers that StopSignal.install replaces."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def installed(on_first: str) -> StopSignal:
    stop = StopSignal(on_first).install()
    # checked before any signal is sent: without its handler, SIGTERM would end the test process
    assert signal.getsignal(signal.SIGTERM) == stop._handle and signal.getsignal(signal.SIGINT) == stop._handle
    return stop


def test_a_first_sigterm_asks_for_a_clean_stop_and_says_so(own_handlers, capsys):
    stop = installed("checkpointing after this iteration")
    assert not stop.requested.is_set() and stop.name is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.wait(BOUND_S) is True
    assert stop.requested.is_set() and stop.name == "SIGTERM"
    assert capsys.readouterr().err == ("\nSIGTERM: checkpointing after this iteration "
                                       "(another Ctrl-C or SIGTERM abandons it)\n")


def test_a_second_signal_abandons_the_run(own_handlers, capsys):
    stop = installed("stopping")
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.wait(BOUND_S) and stop.name == "SIGINT"
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(BOUND_S)  # the handler raises here at the latest
    assert stop.name == "SIGINT"  # the first signal's name is kept
    assert capsys.readouterr().err.count("abandons it") == 1  # only the first signal printed


def test_without_a_signal_nothing_is_asked(own_handlers):
    stop = installed("stopping")
    assert stop.wait(0.05) is False
    assert not stop.requested.is_set() and stop.name is None


def test_installing_off_the_main_thread_leaves_the_handlers_alone(own_handlers):
    """Python lets only the main thread set handlers: elsewhere install() does nothing, rather than raise."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    errors: list[BaseException] = []

    def install() -> None:
        try:
            StopSignal("stopping").install()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive() and errors == []
    assert {sig: signal.getsignal(sig) for sig in before} == before
