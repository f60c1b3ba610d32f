"""Denoising progress as log lines a client can turn into a progress bar.

Each line has tqdm's layout with nothing before the percentage, which is what Replicate's web
UI and its clients parse from the `logs` of a prediction (replicate-python's
`Prediction.progress`, replicate-javascript's `parseProgressFromLogs` and the Go and Rust
clients all match `^\\s*(\\d+)%\\s*\\|.+?\\|\\s*(\\d+)/(\\d+)`, anchored at the start of a line):

     40%|████      | 12/30 [00:01<00:02, 9.52it/s]

Lines are throttled: the first and the last step are always logged, others at most every
`interval` seconds, so a fast GPU does not flood the logs (or the `logs` webhook) and a slow CPU
still shows movement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BAR_WIDTH = 10
DEFAULT_INTERVAL_SECONDS = 0.5


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes:02d}:{seconds:02d}"


def format_progress(done: int, total: int, elapsed: float) -> str:
    """One tqdm-style line: ` 40%|████      | 12/30 [00:01<00:02, 9.52it/s]` (no label before the
    percentage: the clients' pattern is anchored there)."""
    fraction = done / total if total else 1.0
    filled = int(fraction * BAR_WIDTH)
    bar = "█" * filled + " " * (BAR_WIDTH - filled)
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) / rate if rate > 0 else 0.0
    speed = f"{rate:.2f}it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f}s/it"
    return f"{int(fraction * 100):3d}%|{bar}| {done}/{total} [{_clock(elapsed)}<{_clock(remaining)}, {speed}]"


class StepProgress:
    """Counts denoising steps and logs a throttled progress line for them."""

    def __init__(
        self,
        total: int,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
        emit: Callable[[str], None] = log.info,
        later: int = 0,
    ):
        self.total = total
        self.earlier = 0
        """Steps of passes before this one (a second pass counts on from the first's)."""
        self.later = later
        """Steps planned for passes after this one, so one total covers both."""
        self.interval = interval
        self.done = 0
        self._clock = clock
        self._emit = emit
        self._started = clock()
        self._last_logged: float | None = None

    def step(self, note: str = "") -> None:
        """Record one finished step; log a line if it is the first, the last, or `interval` has
        passed (`note` after it: the clients' pattern reads the line's start only)."""
        self.done += 1
        now = self._clock()
        due = self._last_logged is None or now - self._last_logged >= self.interval
        if due or self.done >= self.total:
            self._last_logged = now
            self._emit(format_progress(self.done, self.total, now - self._started) + note)
