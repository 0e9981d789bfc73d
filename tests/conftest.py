import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("INTERBRAIN_TEST_THREADS", "1")))


@pytest.fixture
def tiny_overrides():
    """A small batch so training tests run in seconds; the learning rule is unchanged."""
    return {"num_envs": 8}


@pytest.fixture
def cpu_matmul(monkeypatch):
    """``use(value)`` sets INTERBRAIN_CPU_MATMUL for one test and returns the backend it resolves to (the choice is
    cached per process: cleared on each use and after the test)."""
    from interbrain.agents import linear

    def use(value: str) -> str:
        monkeypatch.setenv(linear.ENV_VAR, value)
        linear.cpu_backend.cache_clear()
        return linear.cpu_backend()
    yield use
    monkeypatch.delenv(linear.ENV_VAR, raising=False)
    linear.cpu_backend.cache_clear()


@pytest.fixture
def small_matmul(monkeypatch):
    """``use(value)`` sets INTERBRAIN_CPU_SMALL_MATMUL for one test and returns the backend it resolves to (cached per
    process like ``cpu_matmul``'s)."""
    from interbrain.agents import linear

    def use(value: str) -> str:
        monkeypatch.setenv(linear.SMALL_ENV_VAR, value)
        linear.small_backend.cache_clear()
        return linear.small_backend()
    yield use
    monkeypatch.delenv(linear.SMALL_ENV_VAR, raising=False)
    linear.small_backend.cache_clear()
