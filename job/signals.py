"""Stopping a long-running command the way orchestrators do: SIGTERM (`ray job stop`, Kubernetes, docker stop,
systemd) and Ctrl-C (SIGINT) mean the same thing. The first asks for a clean stop, a flag the command polls
between units of work; the second abandons it (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import sys
import threading


class StopSignal:
    """Install after `ray.init`: Ray sets its own SIGTERM handler there, which exits 1 mid-work."""

    def __init__(self, on_first: str):
        self.requested = threading.Event()
        self.on_first = on_first  # what the first signal does, printed when it arrives
        self.name: str | None = None  # the first signal's name (SIGTERM, SIGINT)

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.name = signal.Signals(signum).name
        self.requested.set()
        sys.stderr.write(f"\n{self.name}: {self.on_first} (another Ctrl-C or SIGTERM abandons it)\n")
        sys.stderr.flush()

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once a stop was asked for; waits at most `timeout_s` (None: until then)."""
        return self.requested.wait(timeout_s)
