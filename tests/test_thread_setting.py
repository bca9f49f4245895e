"""``LOMDM_TEST_THREADS`` (tests/conftest.py) sets the intra-op thread count every test runs with, so
that the suite can be run at 1 and 2 threads to check that its tolerances do not depend on the
summation order of one machine."""

import os

import pytest
import torch

AT_COLLECTION = torch.get_num_threads()   # after conftest applied LOMDM_TEST_THREADS


@pytest.mark.skipif(not os.environ.get("LOMDM_TEST_THREADS"), reason="LOMDM_TEST_THREADS is not set")
def test_the_requested_thread_count_is_in_effect():
    assert torch.get_num_threads() == int(os.environ["LOMDM_TEST_THREADS"])


def test_a_test_that_changes_the_thread_count_does_not_leak_it():
    torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)   # undone by conftest's fixture


def test_the_thread_count_is_back():
    assert torch.get_num_threads() == AT_COLLECTION
