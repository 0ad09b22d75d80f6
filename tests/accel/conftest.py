"""Shared by the fast-path tests: one intra-op thread (tiny tensors gain nothing from more)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
