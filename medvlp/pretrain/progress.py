"""Progress display for the long loops (pretraining, fine-tuning, evaluation): a tqdm bar on a terminal, plain
lines elsewhere.

    bar = progress_bar(total=500, initial=0, desc="pretrain")     # same calls as tqdm: update, set_postfix, close
    bar.update(1); bar.set_postfix(loss="0.4321")

A tqdm bar redirected into a file (SLURM, CI, nohup) is one ever-growing line of carriage returns. Off a terminal
the display is therefore one plain, self-contained line at the first update and then at most every
`every_s` seconds (default 30, or $MEDVLP_PROGRESS_EVERY_S), plus a last line at the end (a line falls due at an
update and is written at the caller's next `set_postfix`, so it carries that step's loss):

    pretrain 120/500 (24%) | 3.10 it/s | elapsed 0:38 | ETA 2:03 | loss=0.4321

The rate and ETA count only this session's updates (a resumed run's earlier steps are not in the rate).
`MEDVLP_PROGRESS=bar|lines|off` forces a mode.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

DEFAULT_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class NullProgress:
    """A display that shows nothing (other ranks, progress switched off)."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(NullProgress):
    """Plain progress lines, at most one every `every_s` seconds: `desc n/total (pct) | rate | elapsed | ETA |
    postfix`."""

    def __init__(self, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
                 every_s: float = DEFAULT_EVERY_S, stream: TextIO | None = None, clock=time.monotonic) -> None:
        self.total, self.n, self.desc, self.unit = total, int(initial), desc, unit
        self.every_s = float(every_s)
        self.stream = stream
        self._clock = clock
        self._t0 = clock()
        self._n0 = self.n
        self._last_print: float | None = None
        self._printed_n: int | None = None
        self.postfix: dict[str, Any] = {}
        self.lines = 0
        self._due = False
        self._closed = False

    def line(self) -> str:
        """The current state as one line."""
        elapsed = self._clock() - self._t0
        done = self.n - self._n0
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc} {self.n}/{self.total}" if self.total else f"{self.desc} {self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 0.1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return " | ".join(parts).strip()

    def _emit(self) -> None:
        self._due = False
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self._last_print, self._printed_n = self._clock(), self.n
        self.lines += 1

    def update(self, n: int = 1) -> None:
        # a due line waits for the caller's set_postfix (the loops update, then set the step's loss), else for
        # the next update or close
        if self._due:
            self._emit()
        self.n += n
        self._due = self._last_print is None or self._clock() - self._last_print >= self.every_s

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        self.postfix = {**dict(ordered_dict or {}), **kw}
        if self._due:
            self._emit()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        """A last line when the state moved since the last one printed (nothing for a display never updated)."""
        if self._closed:
            return
        self._closed = True
        if self._due or (self._last_print is not None and self._printed_n != self.n):
            self._emit()


def progress_bar(total: int | None = None, initial: int = 0, desc: str = "", disable: bool = False,
                 unit: str = "it", every_s: float | None = None, stream: TextIO | None = None, **tqdm_kw: Any):
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `LineProgress`; a `NullProgress` when
    `disable`. Extra keywords go to tqdm only (e.g. `dynamic_ncols`, `leave`)."""
    mode = os.environ.get("MEDVLP_PROGRESS", "").strip().lower()
    if disable or mode == "off":
        return NullProgress()
    out = stream if stream is not None else sys.stderr
    if mode == "bar" or (mode != "lines" and is_terminal(out)):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out, **tqdm_kw)
    if every_s is None:
        try:
            every_s = float(os.environ.get("MEDVLP_PROGRESS_EVERY_S", "") or DEFAULT_EVERY_S)
        except ValueError:
            every_s = DEFAULT_EVERY_S
    return LineProgress(total=total, initial=initial, desc=desc, unit=unit, every_s=every_s, stream=stream)


# ----------------------------------------------------------------------------------------------- console logging
# Libraries whose INFO lines (a DeepSpeed config dump, accelerate's "Saving current state to ...", MLflow's and
# alembic's store set-up) drown the progress lines: WARNING unless -v.
CHATTY_LIBRARIES = ("DeepSpeed", "deepspeed", "torch.distributed", "alembic", "mlflow", "absl", "accelerate",
                    "transformers", "urllib3", "filelock", "git", "matplotlib", "PIL")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """`warnings.showwarning` for the console: `warning: MESSAGE` on one line, no source line echoed."""
    kind = "" if category in (UserWarning, RuntimeWarning) else f" ({category.__name__})"
    text = " ".join(str(message).split("\n"))
    try:
        print(f"warning{kind}: {text}", file=file or sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed stream: nowhere to say it
        pass


def setup_logging(verbose: bool = False, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Console logging of a command: our INFO (DEBUG with `verbose`), the libraries' at WARNING (INFO with
    `verbose`), Python warnings as one `warning: ...` line (the full default form with `verbose`)."""
    import logging
    import warnings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    if not verbose:  # MLflow sets its loggers' level from this variable when it is imported (after us)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        warnings.showwarning = _one_line_warning
