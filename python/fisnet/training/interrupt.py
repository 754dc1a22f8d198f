"""Ctrl-C that is never lost: while a `Trainer` fits, SIGINT only sets a flag, and the loop raises
KeyboardInterrupt at its next batch or stage boundary.

Python runs a signal handler at the next bytecode of the main thread, wherever that is; when that
is a finaliser (`__del__`, a weakref callback: a DataLoader iterator, a tensor's hooks), the
KeyboardInterrupt raised there is printed as "Exception ignored" and lost, and the run goes on
(seen once in CI: `fisnet train` kept training 60 s after its SIGINT).  A second Ctrl-C before the
loop has reacted raises at once, as without this handler.  Outside the main thread (where Python
cannot install handlers) or when another handler than Python's default is installed (a notebook's,
an application's), nothing changes."""
from __future__ import annotations

import contextlib
import signal
import threading


class InterruptFlag:
    """Set by SIGINT while `deferred()` is active; `check()` raises KeyboardInterrupt once set."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:  # pressed again: the loop did not get there, so stop now
            self.requested = False
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.requested = False
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
            self.check()  # a Ctrl-C during the last stage
        finally:
            signal.signal(signal.SIGINT, previous)
