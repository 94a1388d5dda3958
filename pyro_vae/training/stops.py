"""How a run stops before its last epoch: Ctrl-C (``Interrupted``) or a loss that stopped being finite."""
from __future__ import annotations

import signal
import threading

from pyro_vae.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the parameters stopped being finite."""


class Interrupted(Exception):
    """Ctrl-C during training; a consistent checkpoint was written first when the run has a folder."""


class SigintFlag:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops at once.

    Under torchrun every worker gets the terminal's SIGINT and the agent's copy of it, so there a
    second signal is not taken as "stop at once" (the ranks must stop together, at a step boundary)."""

    def __init__(self, hard_stop: bool = True) -> None:
        self.raised = False
        self.hard_stop = hard_stop
        self._old = None

    def __enter__(self) -> "SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and self.hard_stop:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
