"""The CLI's one error boundary: errors in what the user gave become one line and exit 2, bugs keep their traceback.

    rc = run_command(args.fn, args, verbose=args.verbose)

What counts as the user's error (one `error: ...` line on stderr, exit status 2):
* any exception with a true `user_facing` attribute (ManifestError, LoadError, PathError, DataStreamError, ...);
* `ConfigError` (printed as `config error: ...`);
* `ValueError` and its kin (`UnicodeDecodeError`, `json.JSONDecodeError`): a value read from a file, an option
  or a flag that does not fit; the message names the item;
* `OSError` and its kin (`FileNotFoundError`, `PermissionError`, `IsADirectoryError`, `NotADirectoryError`,
  `FileExistsError`, `urllib.error.HTTPError`, a read-only or full file system): the file or URL in question.
Everything else (`KeyError`, `TypeError`, `AttributeError`, ...) is a bug in medvlp and keeps its traceback.
`medvlp -v ...` shows the traceback of a user error too (for a bug report). The message is the exception's
message as the code wrote it (a manifest's bad rows: one line each); an exception without a message is named by
its type.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

MAX_CHARS = 100_000  # a message longer than this is cut (a manifest with thousands of bad rows lists them all in a file)


def is_user_error(e: BaseException) -> bool:
    """True for errors in the user's input or environment (see the module doc), False for bugs."""
    if getattr(e, "user_facing", False):
        return True
    return isinstance(e, (ValueError, OSError))


def one_line(e: BaseException) -> str:
    """The exception's message (an OSError's file name kept; a message without text: the type's name). Messages
    meant for users are printed whole: a manifest's bad rows are one line each."""
    if isinstance(e, OSError) and e.filename and e.strerror and str(e.filename) not in str(e.strerror):
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e).strip()
    return msg[:MAX_CHARS] if msg else type(e).__name__


def run_command(fn: Callable[[Any], int | None], args: Any, verbose: bool = False) -> int:
    """`fn(args)` behind the boundary: its return code, or 2 after one line for a user error."""
    from medvlp.pretrain.configtree import ConfigError

    try:
        return int(fn(args) or 0)
    except ConfigError as e:
        if verbose:
            raise
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the boundary: user errors in one line, bugs re-raised
        if verbose or not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
