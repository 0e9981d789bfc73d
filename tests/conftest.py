import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("INTERBRAIN_TEST_THREADS", "1")))


@pytest.fixture
def tiny_overrides():
    """A small batch so training tests run in seconds; the learning rule is unchanged."""
    return {"num_envs": 8}
