"""A training run's wall time, summed over its sessions (a checkpoint carries the sum up to it): each
session from the end of its preparation to its last checkpoint (the last session: to summary.json), so
epochs, their test ELBO, checkpoints and the final evaluation count, and in a new run what its kind's
start spent before the first step (the CVAE's baseline, trained first); the rest of preparation,
figures, a session's time after its last checkpoint and the time between sessions do not. Also the clock
of the epoch in progress (a resumed epoch's seconds before its checkpoint count in it) and of
--checkpoint-every."""

from __future__ import annotations

import time


class RunClock:
    """This session's clocks, started when made; `seconds_before` and `epoch_seconds_before` are what
    earlier sessions spent in all and in the epoch the checkpoint stopped in."""

    def __init__(self, seconds_before: float = 0.0, epoch_seconds_before: float = 0.0):
        self.seconds_before, self.epoch_seconds_before = seconds_before, epoch_seconds_before
        self.started = self.last_save = time.perf_counter()
        self.epoch_started = self.started

    @classmethod
    def resumed(cls, state: dict | None, start_seconds: float = 0.0) -> RunClock:
        """The clock of a session that continues checkpoint `state` (None: a new run, whose first
        `start_seconds` were its kind's start: they count). A checkpoint from before pyro-vae recorded the
        seconds: the sum of its whole epochs' seconds."""
        if state is None:
            return cls(start_seconds)
        before = state.get("seconds", sum(m.get("seconds") or 0.0 for m in state["metrics"]))
        return cls(float(before), float(state.get("epoch_seconds", 0.0)))

    def elapsed(self) -> float:
        """The run's wall time so far in seconds, all sessions."""
        return self.seconds_before + time.perf_counter() - self.started

    def start_epoch(self) -> None:
        """An epoch starts (or, resumed, continues with the seconds it had at its checkpoint)."""
        self.epoch_started = time.perf_counter() - self.epoch_seconds_before
        self.epoch_seconds_before = 0.0

    def epoch_seconds(self) -> float:
        """The seconds of the epoch in progress."""
        return time.perf_counter() - self.epoch_started

    def save_due(self, every: float | None) -> bool:
        """Whether more than `every` minutes (--checkpoint-every; None or 0: never) have passed since the
        last checkpoint (`saved`)."""
        return bool(every) and (time.perf_counter() - self.last_save) / 60 > every

    def saved(self) -> None:
        """A checkpoint was just written."""
        self.last_save = time.perf_counter()
