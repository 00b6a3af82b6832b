import os

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
