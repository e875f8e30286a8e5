import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: tests/toy.py

from toy import toy_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE tokenizer trained on the toy records."""
    return toy_tokenizer()
