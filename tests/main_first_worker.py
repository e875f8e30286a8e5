"""Worker for tests/test_distributed.py, launched by torchrun before any process group exists:
each process runs ``main_first`` with a job that logs who ran it, as whom, and when."""

import sys
import time
from pathlib import Path


def main(log_file: str) -> None:
    import os

    from retrieval_lib.settings import distributed

    rank = os.environ["RANK"]

    def job():
        log = Path(log_file)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"start {rank} main={distributed.is_main()}\n")
        time.sleep(0.5)  # a cache being filled: another process must not start meanwhile
        with log.open("a", encoding="utf-8") as f:
            f.write(f"end {rank}\n")

    distributed.main_first(job)
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
