"""The command line: ``python -m retrieval_lib <command> [options]``.

* ``experiment``: train and evaluate one experiment of the report
  (``python -m retrieval_lib experiment --experiment minimind27_10k --preset demo``);
* ``notebooks``: run every notebook in course order with papermill (``make demo``);
* ``memory``: the memory and time plan of every full-preset experiment on each GPU.

``python -m retrieval_lib <command> --help`` lists a command's options.
"""

from __future__ import annotations

import importlib
import sys

#: Command -> the module whose ``main(argv)`` runs it.
COMMANDS = {"experiment": "retrieval_lib.course.experiment",
            "notebooks": "retrieval_lib.course.notebooks",
            "memory": "retrieval_lib.training.memory"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    sys.argv[0] = f"python -m retrieval_lib {argv[0]}"  # argparse's usage line
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
