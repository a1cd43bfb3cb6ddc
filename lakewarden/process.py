"""How a Lakewarden process ends: after its work is durable, without C++ teardown.

pyarrow's native thread pools can abort the interpreter as it finalizes: a worker that is
still alive when Arrow's globals are destroyed makes ``std::thread``'s destructor call
``std::terminate`` ("terminate called without an active exception", exit -6). It is timing
dependent and rare (apache/arrow#34314, #36980, #39862), and it happened here after a
compliance request had finished its work: the caller saw a crash for a request that was done.

So the command-line entry points end through ``exit_process``: they let Python finish
what it owns (other non-daemon threads, atexit handlers such as logging's flush, the
standard streams), then leave with ``os._exit``, which skips the C++ static destructors
where the abort happens. Every table commit, audit flush and key-store write is complete
before this point; nothing that matters lives in a native destructor. Code that imports
Lakewarden as a library (tests, notebooks) is not affected.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_code(exc: SystemExit) -> int:
    """The status a SystemExit stands for: None is 0, a message is printed and is 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_process(code: int) -> NoReturn:
    """Finish Python's own shutdown work, then end the process with ``code``."""
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # an atexit handler's failure must not hide the command's own status
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)


def run_and_exit(fn: Callable[[], object]) -> NoReturn:
    """Run a command's main function and end the process with its status (see module doc)."""
    try:
        fn()
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # a bug, not a user error: show it as Python would, then exit 1
        traceback.print_exc()
        code = 1
    exit_process(code)
