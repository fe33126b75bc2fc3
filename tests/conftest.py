import os
import sys
import tempfile
from pathlib import Path

# Fixtures written on one machine are compared bitwise on another (a run saved by vitlab 0.1.0,
# continued today): the CPU kernels are pinned to AVX2, in this process and the CLI subprocesses
# the tests start. The development machines so far had AVX2 alone, or AVX-512 too, whose
# kernels round differently. Set before torch is imported; a caller's own choice wins. Pinned
# even so, an Intel Xeon rounded the 0.1.0 run's first epoch otherwise than the AMD EPYC that
# wrote it (by up to 4e-7 of a tensor's largest value): the test that continues that run checks
# bitwise only where this machine reproduces its first epoch bitwise.
# torch.compile's generated kernels follow ATEN_CPU_CAPABILITY too, and its on-disk cache does
# not tell them apart: the tests keep their own cache, per user and capability.
for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                      ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):
    os.environ.setdefault(_name, _value)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"vitlab-tests-inductor-{getattr(os, 'getuid', lambda: 0)()}-"
    f"{os.environ['ATEN_CPU_CAPABILITY']}"))

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


class Killed(BaseException):
    """What a killed process is, in-process (no `except Exception` catches it): the tests
    that resume after it raise this."""


@pytest.fixture
def dying_test_pass(monkeypatch):
    """`with dying_test_pass(): fit(...)`: the fit dies in its final test pass (after its last
    checkpoint), as a run killed there would."""
    import contextlib

    def killed(*args, **kwargs):
        raise Killed

    @contextlib.contextmanager
    def dying():
        with monkeypatch.context() as patched:
            patched.setattr("vitlab.train.engine._test", killed)
            with pytest.raises(Killed):
                yield
    return dying
