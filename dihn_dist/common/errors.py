"""How every command ends on an error: one line that names the thing and what was expected, and an exit code.

Exit codes follow the usual convention:
    2  usage: the command line, a config file, or a file or folder it names is not what the command expects
       (ValueError, FileNotFoundError and their subclasses: every input check raises one of these);
    1  runtime: something failed while the work ran (a non-finite loss, a full disk, a dead worker, ...).
`--debug` (or DIHN_DEBUG=1) prints the traceback as well.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, Union

USAGE = 2
RUNTIME = 1
INTERRUPTED = 130


class UsageError(ValueError):
    """Raised where no more specific ValueError/FileNotFoundError fits: the request itself is wrong."""


def cannot_create(flag: str, path, error: OSError) -> ValueError:
    """The one line for an output folder that cannot be created (read-only, no permission, a file on its
    path): it names the flag and the folder the user gave, never a temp path inside it."""
    reason = error.strerror or str(error)
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        reason = "a part of its path is a file, not a folder"
    return ValueError(f"{flag} {path}: cannot create it ({reason}); choose a writable {flag}")


def exit_code(error: BaseException) -> int:
    return USAGE if isinstance(error, (ValueError, FileNotFoundError)) else RUNTIME


def one_line(error: BaseException) -> str:
    """The message on one line (a multi-line message is joined with '; '), prefixed by the type for
    errors whose type says something the message may not (OSError, RuntimeError, ...)."""
    text = "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    if isinstance(error, (ValueError, FileNotFoundError)):
        return text
    return f"{type(error).__name__}: {text}"


def debug_requested(argv) -> bool:
    return "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("DIHN_DEBUG") == "1"


def run_command(body: Callable[[], int], *, debug: bool,
                prefix: Optional[Union[str, Callable[[], str]]] = None) -> int:
    """Run a command's body; turn an exception into one line on stderr and the exit code above.
    `prefix` (text, or a function asked when the error happens) starts that line; default "error"."""
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except SystemExit:
        raise
    except BaseException as error:  # noqa: B902 - every failure ends the command the same way
        if debug:
            traceback.print_exc()
        label = prefix() if callable(prefix) else prefix
        print(f"{label or 'error'}: {one_line(error)}", file=sys.stderr, flush=True)
        return exit_code(error)
