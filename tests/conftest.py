"""Shared fixtures."""
import pytest
import torch


def _with_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster, and immune to other jobs stalling OpenMP on 2 cores."""
    yield from _with_threads(1)


@pytest.fixture
def two_threads():
    """The training step runs its modes side by side only with 2+ torch threads."""
    yield from _with_threads(2)
