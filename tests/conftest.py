"""Shared pytest setup.

Triton kernels run under the interpreter on machines without CUDA; the variable must be set before
``triton`` is first imported, which is why it lives here rather than in the kernel tests.

``LOMDM_TEST_THREADS=N`` runs the tests on N intra-op torch threads (``torch.set_num_threads``).
Float32 reductions are summed in an order that depends on the thread count, so tolerances are
derived from the arithmetic, not from one machine; running a file with ``LOMDM_TEST_THREADS=1``
and ``=2`` (and with ``OMP_NUM_THREADS=1``) checks that they are. Whatever a test sets (the trainer
applies ``train.threads``) is undone after it, so one test's choice never leaks into the next.
"""

import os
import zlib

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_THREADS = os.environ.get("LOMDM_TEST_THREADS")
if _THREADS:
    torch.set_num_threads(int(_THREADS))


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Restores the intra-op thread count each test started with."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's own id: fresh inputs per case, reproducible per test."""
    import torch

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
