import sys
from pathlib import Path

# tests/ holds reference implementations (the tutorial's model) imported by several tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models run fastest so on a shared CPU, and runs
    compared bitwise (or with a fixture written on one thread) need the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
