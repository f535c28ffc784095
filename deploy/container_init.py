"""PID 1 of segserve's container image: the server runs as its child.

As PID 1 itself, BentoML's process manager exits on SIGTERM before its worker has answered the requests in flight,
and the kernel then kills the worker with the container (measured: the request in flight lost its answer). Under
this init (as under Docker's `--init`) the server shuts down gracefully: SIGTERM, SIGINT, SIGHUP and SIGQUIT are
forwarded to the child, orphans are reaped, and the container exits with the child's status.
"""

import os
import signal
import subprocess
import sys


def main(command: list[str]) -> int:
    child = subprocess.Popen(command)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), forward)
    while True:
        try:
            pid, status = os.wait()  # any child: orphans reparented to PID 1 are reaped here too
        except ChildProcessError:
            return 0
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
