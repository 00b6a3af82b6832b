"""imbalance_report inside ``torch.inference_mode()`` (Lightning's validation and predict hooks).

The probe is fitted with autograd; called where inference mode is on (a natural place:
``on_validation_epoch_end``), it must give the same accuracies as outside, not an autograd error.
"""

from __future__ import annotations

import torch

from imbalance_losses.diagnosis.report import imbalance_report, linear_probe_accuracy


def _data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    strong = torch.randn(240, 4, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 4)
    weak = torch.randn(240, 4, generator=g) + 0.3 * torch.nn.functional.one_hot(y, 4)
    return {"image": strong, "audio": weak}, y


def test_probe_inside_inference_mode_equals_outside() -> None:
    feats, y = _data()
    x = feats["audio"]
    outside = linear_probe_accuracy(x[:180], y[:180], x[180:], y[180:], 3)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor, as features computed there are
        inside = linear_probe_accuracy(xi[:180], y[:180], xi[180:], y[180:], 3)
    assert inside == outside
    assert 1 / 3 < outside < 1.0  # a fit that neither fails nor is trivial


def test_report_inside_inference_mode_equals_outside() -> None:
    feats, y = _data()
    head = torch.nn.Linear(8, 3)

    def report() -> dict[str, float]:
        fit = ({m: x[:180] for m, x in feats.items()}, y[:180])
        held = ({m: x[180:] for m, x in feats.items()}, y[180:])
        return imbalance_report(fit, held, head=head).to_dict()

    outside = report()
    with torch.inference_mode():
        inside = report()
    assert inside == outside


def test_a_wrongly_shaped_argument_is_a_type_error_that_says_what_to_give() -> None:
    """A features dict alone, a bare tensor, or a loader yielding something else than
    (features, target) pairs: a TypeError naming the expected form, not an unpacking error."""
    import pytest

    from imbalance_losses import imbalance_report

    y = torch.arange(20) % 2
    feats = {"a": torch.randn(20, 3), "b": torch.randn(20, 3)}
    good = (feats, y)
    for bad in (feats, y, [feats, feats], [(feats,)], 3):
        with pytest.raises(TypeError, match=r"must be \(features, target\)"):
            imbalance_report(bad, good)  # type: ignore[arg-type]
    # a list pair is accepted like a tuple pair
    a = imbalance_report([feats, y], good)
    b = imbalance_report(good, good)
    assert a.probe == b.probe


def test_report_reads_a_training_mode_head_in_eval_mode_and_leaves_it_alone() -> None:
    """A head with BatchNorm and dropout, still in training mode (the report called from a
    training loop or ``on_train_epoch_end``): its running statistics, the RNG and every
    module's mode are left as they were, and the head accuracies are those of the eval-mode
    head on each modality alone (the others zeroed), the same on every call."""
    feats, y = _data()
    torch.manual_seed(0)
    head = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    )
    with torch.no_grad():  # running statistics that differ from the held-out batch's
        head[1].running_mean.uniform_(-1.0, 1.0)
        head[1].running_var.uniform_(0.5, 2.0)
    head.train()
    head[3].eval()  # a submodule the user put in eval mode stays so
    buffers = {k: v.clone() for k, v in head.state_dict().items()}
    modes = [m.training for m in head.modules()]
    fit = ({m: x[:180] for m, x in feats.items()}, y[:180])
    held = ({m: x[180:] for m, x in feats.items()}, y[180:])
    rng = torch.get_rng_state()
    first = imbalance_report(fit, held, head=head).head
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    for k, v in head.state_dict().items():  # no running statistic updated
        assert torch.equal(v, buffers[k]), k
    assert [m.training for m in head.modules()] == modes
    assert imbalance_report(fit, held, head=head).head == first
    reference = torch.nn.Sequential(*head).eval()
    x_image, x_audio = held[0]["image"], held[0]["audio"]
    with torch.no_grad():
        z_image = reference(torch.cat([x_image, torch.zeros_like(x_audio)], 1))
        z_audio = reference(torch.cat([torch.zeros_like(x_image), x_audio], 1))
    assert first["image"] == float((z_image.argmax(1) == held[1]).float().mean())
    assert first["audio"] == float((z_audio.argmax(1) == held[1]).float().mean())


def test_a_head_giving_per_token_logits_is_refused_naming_the_shape() -> None:
    """Token features ``[B, T, D]`` through a plain per-position ``nn.Linear`` give ``[B, T, C]``
    logits: scored against ``[B]`` labels they broadcast (silently, when ``T == B``)."""
    import pytest

    torch.manual_seed(0)
    n, t = 6, 6  # T == B: the shapes broadcast without an error
    tokens = {"image": torch.randn(n, t, 4), "audio": torch.randn(n, t, 4)}
    y = torch.randint(3, (n,))
    head = torch.nn.Linear(8, 3)  # over the concatenated token features: [B, T, 3]
    with pytest.raises(ValueError, match=r"shape \(6, 6, 3\) for modality 'image'.*\[B, C\]"):
        imbalance_report((tokens, y), (tokens, y), head=head)
