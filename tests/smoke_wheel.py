"""Release smoke test of an installed wheel (run by ``.ci/run``; not collected by pytest).

Run it with the interpreter of a virtual environment that holds only the wheel and its runtime
dependencies, from a directory outside the source tree::

    python /path/to/tests/smoke_wheel.py 0.1.0 dist/imbalance_losses-0.1.0.tar.gz

It checks that the package is imported from site-packages (not the checkout), that its
version, metadata and ``py.typed`` are installed, that importing it pulls in no optional
framework, and runs one training step with a real backward through every public module on
tiny random data: each step must give a finite loss and a finite gradient on every encoder,
and must raise no warning (a deprecated torch call in the package fails here).
It also checks the sdist: the files a packager needs to build, test and cite the package, the
same modules as the wheel, and no caches.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import sys
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import imbalance_losses as il

SOURCE = Path(__file__).resolve().parents[1]
OPTIONAL = ("lightning", "pytorch_lightning", "transformers", "accelerate", "matplotlib")
C, B, WIDTH = 3, 8, 4
IN = {"audio": 5, "visual": 6}


class Model(nn.Module):
    """Two linear encoders, concatenation fusion, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(d, WIDTH) for m, d in IN.items()})
        self.head = nn.Linear(WIDTH * len(IN), C)

    def features(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoders[m](x[m]) for m in IN}

    def forward(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.features(x)
        return self.head(torch.cat(list(f.values()), 1)), f


def batch() -> tuple[dict[str, Tensor], Tensor]:
    return {m: torch.randn(B, d) for m, d in IN.items()}, torch.arange(B) % C


def check_step(name: str, model: Model, loss: Tensor) -> None:
    if loss.dim() != 0 or not torch.isfinite(loss):
        raise AssertionError(f"{name}: loss {loss} is not a finite scalar")
    for m, enc in model.encoders.items():
        g = enc.weight.grad
        if g is None or not torch.isfinite(g).all() or not g.abs().sum() > 0:
            raise AssertionError(f"{name}: no finite nonzero gradient on the {m} encoder: {g}")
    print(f"ok  {name}: loss {float(loss.detach()):.4f}")


def arl(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    criterion = il.ARLLoss(nn.CrossEntropyLoss(), head=model.head)
    logits, f = model(x)
    loss = criterion(logits, y, features=f)
    loss.backward()
    return loss


def ogm_ge(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    modulator = il.ModalityGradientModulator(dict(model.encoders.items()), alpha=0.8)
    logits, f = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    k = modulator.step(il.unimodal_logits(model.head, f), y)
    assert k.shape == (len(IN),) and torch.isfinite(k).all(), k
    return loss


def boosting(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    boost = il.SustainedBoostingLoss(C, {m: WIDTH for m in IN}, check_every=10, hidden=8)
    boost.attach_optimizer(torch.optim.Adam([*model.parameters(), *boost.parameters()]))
    f = model.features(x)
    loss = boost(f, y)
    loss.backward()
    assert boost.predict(f).shape == (B, C)
    return loss


def pmr(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    criterion = il.PMRLoss(C, {m: WIDTH for m in IN})
    with torch.no_grad():
        criterion.update_prototypes([(model.features(x), y)])
    logits, f = model(x)
    loss = criterion(logits, y, features=f)
    loss.backward()
    return loss


def blending(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    blend = il.GradientBlending(head=model.head, modalities=list(IN))
    logits, f = model(x)
    loss = blend(logits, y, features=f)
    loss.backward()
    return loss


def mmpareto(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    pareto = il.MMPareto(dict(model.encoders.items()))
    logits, f = model(x)
    fused = nn.functional.cross_entropy(logits, y)
    uni = il.unimodal_logits(model.head, f)
    pareto.backward(fused, {m: nn.functional.cross_entropy(z, y) for m, z in uni.items()})
    return fused.detach()


def agm(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    modulator = il.AdaptiveGradientModulator(model.head)
    f = modulator(model.features(x), y)
    loss = nn.functional.cross_entropy(model.head(torch.cat(list(f.values()), 1)), y)
    loss.backward()
    return loss


def opm(model: Model, x: dict[str, Tensor], y: Tensor) -> Tensor:
    modulator = il.ModalityPredictionModulator(list(IN), head=model.head)
    out = modulator(model.features(x), y)
    loss = nn.functional.cross_entropy(model.head(torch.cat(list(out.features.values()), 1)), y)
    loss.backward()
    return loss


STEPS: dict[str, Callable[[Model, dict[str, Tensor], Tensor], Tensor]] = {
    "ARLLoss": arl,
    "ModalityGradientModulator (OGM-GE)": ogm_ge,
    "SustainedBoostingLoss": boosting,
    "PMRLoss": pmr,
    "GradientBlending": blending,
    "MMPareto": mmpareto,
    "AdaptiveGradientModulator (AGM)": agm,
    "ModalityPredictionModulator (OPM)": opm,
}


SDIST_NEEDS = (
    "PKG-INFO", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md",
    "CITATION.cff", "imbalance_losses/py.typed", "tests/conftest.py", "tests/smoke_wheel.py",
    "docs/index.md", "examples/benchmark.py", "examples/requirements-data.txt", ".ci/run",
)  # fmt: skip
CACHES = {"__pycache__", ".git", ".venv", ".hypothesis", ".pytest_cache", ".mypy_cache"}


def check_sdist(path: Path, version: str) -> None:
    top = f"imbalance_losses-{version}/"
    with tarfile.open(path) as sdist:
        names = sdist.getnames()
    assert all(n == top.rstrip("/") or n.startswith(top) for n in names), names
    files = {n.removeprefix(top) for n in names}
    missing = [f for f in SDIST_NEEDS if f not in files]
    assert not missing, f"the sdist lacks {missing}"
    junk = sorted(f for f in files if set(f.split("/")) & CACHES or f.endswith(".pyc"))
    assert not junk, f"the sdist holds {junk}"
    dist = importlib.metadata.distribution("imbalance-losses")
    wheel = {str(f) for f in dist.files or () if str(f).startswith("imbalance_losses/")}
    source = {f for f in files if f.startswith("imbalance_losses/") and f.endswith(".py")}
    assert source and source <= wheel, f"modules of the sdist not in the wheel: {source - wheel}"
    print(f"ok  sdist {path.name}: {len(files)} entries, its {len(source)} modules in the wheel")


def main(expected_version: str, sdist: Path) -> None:
    installed = Path(il.__file__).resolve().parent
    assert SOURCE not in installed.parents, f"imported from the source tree: {installed}"
    assert "site-packages" in installed.parts, f"not an installed package: {installed}"
    assert il.__version__ == expected_version, (il.__version__, expected_version)
    meta = importlib.metadata.metadata("imbalance-losses")
    assert meta["Version"] == expected_version, meta["Version"]
    assert meta["License-Expression"] == "MIT", meta["License-Expression"]
    assert importlib.resources.files("imbalance_losses").joinpath("py.typed").is_file()
    import imbalance_losses.integrations  # noqa: F401  (must import no framework either)

    loaded = sorted(m for m in OPTIONAL if m in sys.modules)
    assert not loaded, f"importing imbalance_losses imported {loaded}"
    print(f"ok  imbalance_losses {il.__version__} from {installed}, py.typed, no optional imports")
    check_sdist(sdist, expected_version)
    warnings.simplefilter("error")
    for name, step in STEPS.items():
        torch.manual_seed(0)
        model = Model()
        check_step(name, model, step(model, *batch()))
    print(f"smoke test of the installed wheel passed: {len(STEPS)} modules")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
