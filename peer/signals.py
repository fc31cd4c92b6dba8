"""Ctrl+C and SIGTERM: the peer finishes its current step (or abandons the all-reduce), saves and leaves."""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between inner steps and while waiting for the all-reduce."""

    def __init__(self, *, handle_signals: bool = True):
        self.event = threading.Event()
        self.pid = os.getpid()
        self.handle_signals = handle_signals
        self.install()

    def install(self) -> None:
        """(Re)install the handlers; hivemind sets SIGINT to ignored when it starts its averager."""
        if not self.handle_signals:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if os.getpid() != self.pid:  # a forked hivemind process inherited this handler
            # Ctrl+C, and a SIGTERM sent to the whole process group (systemd, `timeout`, kill -- -PGID), reach the
            # children too: while the peer's main process lives, it shuts them down gracefully (and SIGKILLs any
            # that hang), so they ignore the signal; an orphaned child obeys SIGTERM
            if signum == signal.SIGTERM and os.getppid() != self.pid:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.event.is_set():
            raise KeyboardInterrupt  # a second Ctrl+C: leave now
        logger.info(f"received {signal.Signals(signum).name}: finishing the current step and leaving")
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()
