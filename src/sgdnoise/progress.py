"""Progress of one long run on the command line (`sgdnoise train`).

On a terminal: a tqdm bar with steps, examples per second, the time left and the last
evaluation. Otherwise (a log file, a batch scheduler's output): one line per evaluation,
so a paper-scale run of hours says where it is without filling the log. Sweeps keep their
own status line and do not use this.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _eval_text(row: dict[str, float]) -> str:
    parts = [f"train loss {row['train_loss']:.4g}"]
    if "test_accuracy" in row:
        parts.append(f"test acc {row['test_accuracy']:.4f}")
    else:
        parts.append(f"test loss {row['test_loss']:.4g}")
    return ", ".join(parts)


class Progress:
    """`update(step)` now and then, `evaluated(step, row)` at each evaluation, `close()`."""

    def __init__(self, total: int, start: int, batch_size: int, stream: TextIO | None = None):
        self.total, self.start, self.batch_size = total, start, batch_size
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last = ""  # the last evaluation, as text
        self.bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            # A terminal that reports no size (a bare pty, some schedulers' consoles) would
            # make tqdm hide the bar (no rows to draw it in): fall back to 100 x 20.
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=total, initial=start, unit="step", file=self.stream,
                            ncols=size.columns, nrows=size.lines, mininterval=0.5,
                            leave=True)  # fmt: skip

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            rate = (step - self.start) * self.batch_size / max(time.monotonic() - self.t0, 1e-9)
            # The rate first: a narrow terminal cuts the end of the line.
            self.bar.set_postfix_str(f"{rate:,.0f} ex/s, {self.last}", refresh=False)
            self.bar.refresh()

    def evaluated(self, step: int, row: dict[str, float]) -> None:
        text = self.last = _eval_text(row)
        if self.bar is not None:
            self.update(step)
            return
        elapsed = time.monotonic() - self.t0
        done = step - self.start
        rate = done * self.batch_size / max(elapsed, 1e-9)
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        left = _duration(eta) if done > 0 else "?"
        pct = 100 * step / max(self.total, 1)
        print(f"step {step}/{self.total} ({pct:.0f}%): {text}; {rate:,.0f} ex/s; "
              f"{left} left", file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
