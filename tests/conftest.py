import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("INTERBRAIN_TEST_THREADS", "1")))


@pytest.fixture
def tiny_overrides():
    """A small batch so training tests run in seconds; the learning rule is unchanged."""
    return {"num_envs": 8}


def _backend_setter(monkeypatch, env_var: str, choice):
    """``use(value)``: set ``env_var`` for one test and return what the cached ``choice()`` resolves it to."""
    def use(value: str) -> str:
        monkeypatch.setenv(env_var, value)
        choice.cache_clear()
        return choice()
    return use


@pytest.fixture
def cpu_matmul(monkeypatch):
    """``use(value)`` sets INTERBRAIN_CPU_MATMUL for one test and returns the backend it resolves to (the choice is
    cached per process: cleared on each use and after the test)."""
    from interbrain.agents import linear

    yield _backend_setter(monkeypatch, linear.ENV_VAR, linear.cpu_backend)
    monkeypatch.delenv(linear.ENV_VAR, raising=False)
    linear.cpu_backend.cache_clear()


@pytest.fixture
def small_matmul(monkeypatch):
    """The same for INTERBRAIN_CPU_SMALL_MATMUL (``linear.small_backend``)."""
    from interbrain.agents import linear

    yield _backend_setter(monkeypatch, linear.SMALL_ENV_VAR, linear.small_backend)
    monkeypatch.delenv(linear.SMALL_ENV_VAR, raising=False)
    linear.small_backend.cache_clear()
