"""Write ``tests/data/saved_states_0_1_0.pt``: state dicts saved by the 0.1.0 classes.

Run from the repository root, with the 0.1.0 code::

    PYTHONPATH=. python tests/data/make_saved_states.py

For each case of ``tests/saved_states.py`` (one per public stateful class; ARL in both of its
modes) the file holds, under the case's name:

* ``state``: the method object's ``state_dict()`` after a few training steps;
* ``model``: the user's model at that point (parameters and any pending ``.grad``);
* ``inputs``: the inputs of the next step;
* ``outputs``: what the uninterrupted object computed on that next step (losses, gradients,
  coefficients, records, step counters), as plain dicts, lists, tensors and numbers.

The file is written once, by the release whose behaviour it freezes; later releases must load it
and replay the next step to the same outputs (``tests/test_saved_states.py``). Do not regenerate
it to make that test pass.
"""

from __future__ import annotations

import copy
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import imbalance_losses  # noqa: E402
from tests.saved_states import CASES, as_plain, model_snapshot  # noqa: E402

OUT = Path(__file__).with_name("saved_states_0_1_0.pt")


def main() -> None:
    torch.set_num_threads(1)
    entries = {}
    for index, (name, build) in enumerate(CASES.items()):
        torch.manual_seed(0)  # no case draws from the global generator; fixed all the same
        gen = torch.Generator().manual_seed(index)
        case = build()
        case.train(gen)
        state = copy.deepcopy(case.obj.state_dict())
        model = model_snapshot(case.model)
        inputs = case.next_inputs(gen)
        outputs = as_plain(case.next_step(copy.deepcopy(inputs)))
        entries[name] = {"state": state, "model": model, "inputs": inputs, "outputs": outputs}
    torch.save(
        {
            "written_by": {
                "imbalance_losses": imbalance_losses.__version__,
                "torch": str(torch.__version__),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "machine": platform.machine(),
            },
            "entries": entries,
        },
        OUT,
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(entries)} entries)")


if __name__ == "__main__":
    main()
