"""Entry point of the watchdog process (see `_process.Watchdog`).

argv[1] is a JSON list: the cleanup command. It runs when stdin reaches EOF, unless the parent
wrote "disarm" first.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys


def main() -> int:
    cleanup: list[str] = json.loads(sys.argv[1])
    # The parent's terminal may send signals to everything it started; only EOF decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    data = sys.stdin.buffer.read()
    if b"disarm" in data:
        return 0
    return subprocess.run(cleanup, check=False, timeout=120).returncode


if __name__ == "__main__":
    sys.exit(main())
