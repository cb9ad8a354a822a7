"""Progress of long work (reading 100,000 headers, checking a manifest, a benchmark grid, fine-tuning epochs): a bar
redrawn in place on a terminal, plain lines at most every `every_s` seconds when the output is a file (cluster
logs, where a redrawn bar would be thousands of lines). Our own because tqdm is not a dependency of voco (MONAI
shows cache progress only where tqdm is installed), and the log-file mode is what cluster users need most."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``42s``, ``6m58s``, ``3h07m``, ``2d04h``."""
    seconds = max(int(round(seconds)), 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"



class Progress:
    """``with Progress(total, "read headers") as progress: ... progress.update(done)``.

    Args:
        total: how many units the work has (0 or fewer: nothing is shown).
        what: what is being counted, e.g. "volume headers read".
        stream: where to write (default: standard error, so it never mixes into output a user pipes on).
        every_s: the least time between two lines when the stream is not a terminal.
        minimum: show nothing for work of fewer units than this (a ten-file folder needs no bar).
        enabled: False shows nothing (e.g. on every rank but 0 under torchrun).
        start: units done before this process began (a resumed run): the rate and ETA count only the new ones.
    """

    def __init__(self, total: int, what: str, *, stream: TextIO | None = None, every_s: float = 30.0,
                 minimum: int = 1, enabled: bool = True, start: int = 0) -> None:
        self.total, self.what, self.stream = int(total), what, stream or sys.stderr
        self.every_s, self.start = float(every_s), int(start)
        self.done, self.drawn = self.start, False
        self.shown = enabled and self.total >= max(int(minimum), 1)
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.started = self._last_line = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def text(self) -> str:
        """``1,200/5,000 volume headers read (24.0%, 410/s, ETA 9s)``."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = (self.done - self.start) / elapsed
        share = self.done / self.total if self.total else 1.0
        eta = f", ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        return f"{self.done:,}/{self.total:,} {self.what} ({share:.1%}, {rate:.3g}/s{eta})"

    def update(self, done: int | None = None) -> None:
        """Record progress (`done` units in all, or one more unit) and show it if it is time."""
        self.done = self.done + 1 if done is None else int(done)
        if not self.shown:
            return
        now = time.perf_counter()
        if self.terminal:
            filled = round(BAR_WIDTH * min(self.done / max(self.total, 1), 1.0))
            self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.text()}\033[K")
            self.stream.flush()
            self.drawn = True
        elif now - self._last_line >= self.every_s and self.done < self.total:
            self._last_line = now
            print(self.text(), file=self.stream, flush=True)

    def clear(self) -> None:
        """Take the bar off its line (before other output is printed there; it comes back at the next update)."""
        if self.terminal and self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        """End the bar's line on a terminal; one closing line in a log (only for work long enough to have been
        reported while it ran)."""
        if not self.shown:
            return
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()
        elif self._last_line > self.started:
            print(self.text(), file=self.stream, flush=True)
        self.shown = False
