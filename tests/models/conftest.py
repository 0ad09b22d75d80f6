"""Shared by the model tests: one intra-op thread, and a record of which code path ran."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine they spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def record_calls(monkeypatch, module, *names: str) -> list:
    """Wraps the module functions `names` so that each call appends its name to the returned
    list (the wrapped function still runs): the tests of a module with two paths use it to check
    which one ran."""
    calls: list = []
    for name in names:
        original = getattr(module, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    return calls
