"""``python -m filter_worker`` and the ``filter-worker`` command: SIGHUP is taken before the commands load.

Importing the commands takes most of a second; a SIGHUP meanwhile (a reload sent to every pod) would
end the process silently under Python's default.
"""

import sys

from filter_worker.service.signals import Requests, take_reloads


def main() -> int:
    requests = Requests()
    take_reloads(requests)
    from filter_worker.cli import main as run_command

    return run_command(requests=requests)


if __name__ == "__main__":
    sys.exit(main())
