"""Shared pytest setup.

Triton kernels run under the interpreter on machines without CUDA; the variable must be set before
``triton`` is first imported, which is why it lives here rather than in the kernel tests.
"""

import os
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's own id: fresh inputs per case, reproducible per test."""
    import torch

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
