"""Progress lines: tqdm's layout, as Replicate's clients parse it, throttled, first and last always."""

import re

from sdcog.generate.progress import StepProgress, format_progress

# The pattern of replicate-python's Prediction.progress, replicate-javascript's parseProgressFromLogs
# and the Go and Rust clients: anchored at the start of the line.
TQDM_LINE = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)\/(\d+)")


def test_a_line_reads_like_tqdm_and_parses_back():
    line = format_progress(12, 30, 1.26)
    assert line == " 40%|████      | 12/30 [00:01<00:01, 9.52it/s]"
    assert TQDM_LINE.match(line).groups() == ("40", "12", "30")


def test_slow_steps_are_shown_in_seconds_per_step():
    assert format_progress(1, 4, 3.0).endswith("[00:03<00:09, 3.00s/it]")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(total, step_seconds, interval=0.5):
    clock, lines = FakeClock(), []
    progress = StepProgress(total, interval=interval, clock=clock, emit=lines.append)
    for _ in range(total):
        clock.now += step_seconds
        progress.step()
    return [int(TQDM_LINE.match(line).group(2)) for line in lines]


def test_fast_steps_are_throttled_but_the_first_and_last_are_always_logged():
    # 100 steps of 20 ms: 2 s in all, so a line every 0.5 s (25 steps) plus the first and the last.
    assert run_steps(100, 0.02) == [1, 26, 51, 76, 100]


def test_slow_steps_are_each_logged():
    assert run_steps(5, 1.0) == [1, 2, 3, 4, 5]


def test_the_total_can_change_once_the_scheduler_knows_its_step_count():
    clock, lines = FakeClock(), []
    progress = StepProgress(30, clock=clock, emit=lines.append)
    progress.total = 24  # image-to-image at prompt_strength 0.8
    for _ in range(24):
        clock.now += 1
        progress.step()
    assert lines[-1].startswith("100%|██████████| 24/24")
