"""The diffusion decoder learns to use its per-patch condition at the demo's size.

A pixel target that is a function of the condition: after a few hundred steps with the demo's
decoder (width 64, depth 2, zero-initialised adaLN, as released) and the demo's optimiser
settings, the eps-MSE with the true condition is far below the MSE with the conditions shuffled
across rows. So a decoder that scores alike on true and shuffled conditions in a training run is
being given conditions that carry nothing per patch; the decoder's initialisation is not the cause.

Its width is a cause: the eps target is full-rank noise, and a decoder narrower than its target
spends its whole width copying that noise through, so even a condition that fixes the target
exactly does not lower its MSE. The demo's decoder (width 64, patches of 588 values) is one;
the presets' (width 1536) is not.
"""
import pytest
import torch

from ivfast.config import DecoderConfig
from ivfast.models.diffusion import DiffusionLoss


def _mse(model, target, cond, draws=4):
    total = 0.0
    with torch.no_grad():
        for d in range(draws):
            torch.manual_seed(100 + d)             # the same timesteps and noise for every condition
            total += float(model(target, cond)["mse"]) / draws
    return total


def _train_and_score(D, width, steps=300, C=16, R=256):
    """eps-MSE with the true and with shuffled conditions after ``steps`` steps on a target that
    is a function of the condition."""
    torch.manual_seed(0)
    mix = torch.randn(C, D) / C ** 0.5
    model = DiffusionLoss(DecoderConfig(depth=2, width=width, impl="eager", learn_sigma=True, dtype="fp32"), D, C)
    # the demo's settings: AdamW, peak lr 5e-2 x 4 / 256, weight decay 0.05, clipping at 5
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2 * 4 / 256, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        z = torch.randn(R, C, generator=g)
        loss = model(torch.tanh(3 * z @ mix), z)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    z = torch.randn(4 * R, C, generator=g)
    target = torch.tanh(3 * z @ mix)
    return _mse(model, target, z), _mse(model, target, z[torch.randperm(len(z), generator=g)])


def test_decoder_uses_a_condition_the_target_depends_on():
    true, shuffled = _train_and_score(D=48, width=64)
    assert true < 0.6 * shuffled, (true, shuffled)


@pytest.mark.parametrize("width, uses_condition", [(8, False), (128, True)])
def test_a_decoder_narrower_than_its_target_cannot_use_the_condition(width, uses_condition):
    # measured: width 8 -> true 0.9524, shuffled 0.9527; width 128 -> 0.30 vs 0.59 (96 values)
    true, shuffled = _train_and_score(D=96, width=width, steps=200, R=128)
    if uses_condition:
        assert true < 0.7 * shuffled, (true, shuffled)
    else:
        assert true > 0.98 * shuffled, (true, shuffled)


class _OracleNet(torch.nn.Module):
    """eps from x_t given the clean patch as the condition: exact with the row's own condition."""

    def __init__(self, diffusion):
        super().__init__()
        self.d = diffusion

    def forward(self, xt, t, z):
        tb = self.d.tables(xt.device)     # t: the training diffusion's own steps
        return (xt - tb["sqrt_ac"][t][:, None] * z) / tb["sqrt_1m_ac"][t][:, None]


class _BlindNet(torch.nn.Module):
    def forward(self, xt, t, z):
        return 0.9 * xt


def _gap_problem(net_cls, rows=96, clips=12, D=12):
    loss = DiffusionLoss(DecoderConfig(depth=1, width=16, impl="eager", learn_sigma=False, dtype="fp32"), D, D)
    loss.net = net_cls(loss.train_diffusion) if net_cls is _OracleNet else net_cls()
    x0 = torch.randn(rows, D, generator=torch.Generator().manual_seed(3))
    groups = torch.arange(clips).repeat_interleave(rows // clips)
    return loss, x0, groups


def test_condition_gap_sees_a_decoder_that_uses_its_condition():
    loss, x0, groups = _gap_problem(_OracleNet)
    r = loss.condition_gap(x0, x0, groups, draws=2, seed=0)
    assert r["mse_true"] < 1e-3 < r["mse_shuffled"], r
    assert r["gap_ci95"][0] > 0 and r["gap"] == pytest.approx(r["mse_shuffled"] - r["mse_true"], rel=1e-9)
    assert len(r["gap_by_t_quarter"]) == 4 and r["rows"] == 96 and r["clips"] == 12
    # the overall numbers are the mean over the four quarters (t uniform, as in training)
    assert r["mse_true"] == pytest.approx(sum(r["mse_true_by_t_quarter"]) / 4)


def test_condition_gap_of_a_decoder_that_ignores_its_condition_is_zero():
    loss, x0, groups = _gap_problem(_BlindNet)
    r = loss.condition_gap(x0, torch.randn_like(x0), groups, draws=2, seed=0)
    assert r["gap"] == 0.0 and r["gap_ci95"] == [0.0, 0.0], r
    assert r["mse_true"] == r["mse_shuffled"] == r["mse_zero"] > 0


def test_condition_gap_rejects_a_group_per_clip_mismatch():
    loss, x0, groups = _gap_problem(_BlindNet)
    with pytest.raises(ValueError, match="one group id per row"):
        loss.condition_gap(x0, x0, groups[:-1])
