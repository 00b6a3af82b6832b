import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Small, deterministic CPU runs: the suite must fit in a few minutes on 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For tests of tiny models run through a trainer: one intra-op thread is fastest (and fair
    on a shared machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
