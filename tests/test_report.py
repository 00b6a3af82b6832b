"""imbalance_report and its linear probe: known separations, chance on noise, the verdict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imbalance_losses.diagnosis.report import (
    ImbalanceReport,
    imbalance_report,
    linear_probe_accuracy,
)


def _blobs(
    n: int, classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-mean features (means 10 apart) with Gaussian noise: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 10
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_probe_recovers_a_known_linear_separation() -> None:
    # labels given by a known hyperplane pair, with a margin: a linear classifier exists
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 5, generator=g)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.0], [0.0, 1.0, 1.0, -1.0, 0.0]])
    s = x @ w.T
    keep = (s.abs() > 0.3).all(1)
    x, s = x[keep], s[keep]
    y = (s[:, 0] > 0).long() * 2 + (s[:, 1] > 0).long()  # 4 classes from 2 hyperplanes
    n = x.shape[0] * 3 // 4
    assert linear_probe_accuracy(x[:n], y[:n], x[n:], y[n:], 4) >= 0.97


def test_probe_is_at_chance_on_noise() -> None:
    g = torch.Generator().manual_seed(2)
    classes, n_eval = 10, 2000
    y = torch.arange(3000) % classes
    x = torch.randn(3000, 16, generator=g)  # no information about y
    acc = linear_probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], classes)
    p = 1 / classes
    assert abs(acc - p) < 4 * math.sqrt(p * (1 - p) / n_eval)


def test_probe_is_deterministic_and_checks_its_input() -> None:
    x, y = _blobs(200, 4, 6, 6.0, 0)
    first = linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], 4)
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], 4) == first
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        linear_probe_accuracy(x[:150], y[:149], x[150:], y[150:], 4)
    with pytest.raises(ValueError, match="class indices in \\[0, 3\\)"):
        linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], 3)
    bad = x.clone()
    bad[3, 2] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe_accuracy(bad[:150], y[:150], x[150:], y[150:], 4)
    with pytest.raises(ValueError, match="same width"):
        linear_probe_accuracy(x[:150], y[:150], x[150:, :3], y[150:], 4)


def _task(seed: int = 0) -> dict[str, torch.Tensor]:
    """A strong modality, a weak joint encoder (little signal) and a strong lone one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(800) % 4
    onehot = nn.functional.one_hot(y, 6).float()
    return {
        "y": y,
        "image": torch.randn(800, 6, generator=g) + 3.0 * onehot,
        "audio": torch.randn(800, 6, generator=g) + 0.3 * onehot,
        "alone": torch.randn(800, 6, generator=g) + 3.0 * onehot,
        "alone_image": torch.randn(800, 6, generator=g) + 3.0 * onehot,
    }


def _sets(t: dict[str, torch.Tensor], names: dict[str, str], lo: int, hi: int):  # type: ignore[no-untyped-def]
    return {m: t[k][lo:hi] for m, k in names.items()}, t["y"][lo:hi]


def test_report_values_equal_separate_probes_and_the_head_formula() -> None:
    t = _task()
    head = nn.Linear(12, 4)
    names = {"image": "image", "audio": "audio"}
    report = imbalance_report(_sets(t, names, 0, 600), _sets(t, names, 600, 800), head=head)
    for m in names:
        want = linear_probe_accuracy(t[m][:600], t["y"][:600], t[m][600:], t["y"][600:], 4)
        assert report.probe[m] == want
    # head: z_m = x_m W_m^T + b / 2, the exact split of the linear head
    w, b = head.weight.detach(), head.bias.detach()
    z_image = t["image"][600:] @ w[:, :6].T + b / 2
    z_audio = t["audio"][600:] @ w[:, 6:].T + b / 2
    y = t["y"][600:]
    assert report.head["image"] == pytest.approx(float((z_image.argmax(1) == y).double().mean()))
    assert report.head["audio"] == pytest.approx(float((z_audio.argmax(1) == y).double().mean()))
    assert report.num_classes == 4 and report.num_fit == 600 and report.num_evaluated == 200
    assert report.alone == {} and report.under_trained == ()
    assert report.weakest == "audio"
    assert "audio is the weakest modality" in report.verdict and "alone=" in report.verdict


def test_report_finds_the_under_trained_modality_and_says_by_how_much() -> None:
    t = _task()
    names = {"image": "image", "audio": "audio"}
    alone = (_sets(t, {"audio": "alone"}, 0, 600), _sets(t, {"audio": "alone"}, 600, 800))
    report = imbalance_report(_sets(t, names, 0, 600), _sets(t, names, 600, 800), alone=alone)
    assert report.probe["audio"] < 0.6 and report.alone["audio"] > 0.9
    assert report.deficit == {"audio": report.alone["audio"] - report.probe["audio"]}
    assert report.under_trained == ("audio",)
    text = str(report)
    points = f"{100 * report.deficit['audio']:.1f} points lower"
    assert "**audio is under-trained**" in text and points in text
    assert "| modality | probe acc % | alone probe acc % | deficit (points) |" in text
    assert "| image | " in text and " | — | — |" in text  # no lone image encoder given
    d = report.to_dict()
    assert d["imbalance/audio/deficit"] == report.deficit["audio"]
    assert d["imbalance/audio/alone_probe_acc"] == report.alone["audio"]
    assert set(d) == {
        "imbalance/image/probe_acc",
        "imbalance/audio/probe_acc",
        "imbalance/audio/alone_probe_acc",
        "imbalance/audio/deficit",
    }


def test_no_under_training_within_sampling_noise() -> None:
    t = _task()
    names = {"image": "image", "audio": "alone"}  # the joint audio encoder is as good as alone
    alone = (
        _sets(t, {"image": "alone_image", "audio": "alone"}, 0, 600),
        _sets(t, {"image": "alone_image", "audio": "alone"}, 600, 800),
    )
    report = imbalance_report(_sets(t, names, 0, 600), _sets(t, names, 600, 800), alone=alone)
    assert report.under_trained == ()
    assert report.verdict.startswith("No modality is under-trained")


def test_margin_is_twice_the_standard_error_of_a_difference() -> None:
    r = ImbalanceReport(modalities=("a",), probe={"a": 0.8}, num_evaluated=400)
    assert r.margin(0.9, 0.8) == pytest.approx(2 * math.sqrt((0.09 + 0.16) / 400))
    assert r.margin(1.0, 1.0) == 1 / 400


def test_batches_are_concatenated_and_bad_input_is_named() -> None:
    t = _task()
    names = {"image": "image", "audio": "audio"}
    whole = imbalance_report(_sets(t, names, 0, 600), _sets(t, names, 600, 800))
    batched = imbalance_report(
        [_sets(t, names, lo, lo + 100) for lo in range(0, 600, 100)],
        iter([_sets(t, names, 600, 700), _sets(t, names, 700, 800)]),
    )
    assert batched == whole
    with pytest.raises(ValueError, match="modalities"):
        imbalance_report(_sets(t, names, 0, 600), _sets(t, {"audio": "audio"}, 600, 800))
    with pytest.raises(ValueError, match="video"):
        imbalance_report(
            _sets(t, names, 0, 600),
            _sets(t, names, 600, 800),
            alone=(_sets(t, {"video": "alone"}, 0, 600), _sets(t, {"video": "alone"}, 600, 800)),
        )
    with pytest.raises(ValueError, match=r"features\['audio'\] must be \[N, D\]"):
        imbalance_report(
            ({"image": t["image"][:10], "audio": t["audio"][:9]}, t["y"][:10]),
            _sets(t, names, 600, 800),
        )
    with pytest.raises(ValueError, match="class indices"):
        imbalance_report(
            ({"image": t["image"][:10]}, t["y"][:10].float()), _sets(t, names, 600, 800)
        )


def test_verdict_names_the_modality_the_head_relies_on_least() -> None:
    r = ImbalanceReport(
        modalities=("a", "b"),
        probe={"a": 0.8, "b": 0.95},
        head={"a": 0.3, "b": 0.9},
        num_classes=10,
        num_evaluated=400,
    )
    assert "relies least on a: its logits through the shared head reach 30.0 %" in r.verdict
    assert "against 80.0 % for its probe (b: 90.0 % vs 95.0 %)" in r.verdict
    even = ImbalanceReport(
        modalities=("a", "b"), probe={"a": 0.8, "b": 0.9}, head={"a": 0.79, "b": 0.9},
        num_evaluated=400,
    )  # fmt: skip
    assert "relies least" not in even.verdict  # 1 point on 400 samples is noise
