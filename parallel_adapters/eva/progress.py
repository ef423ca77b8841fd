"""EVA's progress report on one rank: a tqdm bar on a terminal, plain lines anywhere else.

Under torchrun, SLURM or `| tee`, stderr is a pipe or a file, where a bar is either invisible or a
mess of carriage returns; there a line every `LOG_EVERY` steps (and a last one) says how far EVA
is, how many layers have converged and how fast it goes.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_EVERY = 10
"""Steps between two progress lines when stderr is not a terminal."""


class Progress:
    """`update(step, converged, total)` after every EVA step, `close(...)` at the end.  Silent
    unless `enabled` (the caller passes show_progress_bar and "this is world rank 0")."""

    def __init__(self, max_steps: int, enabled: bool, stream: TextIO | None = None, every: int | None = None):
        self.max_steps, self.enabled = max_steps, enabled
        self.stream = sys.stderr if stream is None else stream
        self.every = LOG_EVERY if every is None else every
        self.started = time.perf_counter()
        self.bar = tqdm(total=max_steps, leave=False, file=self.stream) if enabled and _is_terminal(self.stream) else None

    def update(self, step: int, converged: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"EVA: {converged}/{total} layers have converged")
            self.bar.update(step - self.bar.n)
        elif self.enabled and step % self.every == 0:
            self._line(f"EVA step {step}/{self.max_steps}: {converged}/{total} layers converged", step)

    def close(self, step: int, converged: int, total: int, capped: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            how = f"stopped at max_steps={self.max_steps}" if capped else f"done after {step} steps"
            self._line(f"EVA {how}: {converged}/{total} layers converged", step)

    def _line(self, text: str, step: int) -> None:
        seconds = time.perf_counter() - self.started
        rate = f", {seconds / step:.2f} s/step" if step else ""
        print(f"{text} ({seconds:.1f} s{rate})", file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
