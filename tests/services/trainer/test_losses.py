"""Trainer losses as specifications: each expected number is written out from the formula.

Inputs are small fixed float64 tensors. Every loss is checked four ways: its value against the
formula computed by hand, its gradient against autograd of the formula written out here, its
indifference to whatever sits in the padding, and the error that names a missing input.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignd_server.common.errors import InvalidArgument
from alignd_server.trainer.losses import LOSSES
from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    masked_mean,
    masked_sum,
    sequence_logps,
)
from alignd_server.trainer.losses.bradley_terry import bradley_terry
from alignd_server.trainer.losses.cross_entropy import cross_entropy
from alignd_server.trainer.losses.dpo import dpo
from alignd_server.trainer.losses.kto import kto
from alignd_server.trainer.losses.policy_gradient import policy_gradient
from alignd_server.trainer.losses.ppo import ppo

TOL = 1e-6
F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def leaf(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64, requires_grad=True)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def grad_of(loss: torch.Tensor, *wrt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, wrt)


def assert_close(actual, expected) -> None:
    actual = torch.as_tensor(actual, dtype=F64)
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOL)


def with_padding(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` with every padded position replaced by ``fill``."""
    return torch.where(mask.bool(), x.detach(), torch.full_like(x, fill))


# (2, 3): row 0 has 2 completion tokens, row 1 has 3.
MASK = t([[1, 1, 0], [1, 1, 1]])
LOGPROBS = [[-0.5, -1.0, 0.0], [-0.2, -0.3, -2.0]]


# --- base helpers ------------------------------------------------------------------------------


def test_masked_reductions() -> None:
    x = t([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    assert_close(masked_sum(x, MASK), 1 + 2 + 3 + 4 + 5)
    assert_close(masked_mean(x, MASK), (1 + 2 + 3 + 4 + 5) / 5)
    assert_close(masked_mean(x, MASK, dim=-1), [1.5, 4.0])
    assert_close(sequence_logps(x, MASK), [3.0, 12.0])
    assert_close(masked_mean(x, torch.zeros_like(MASK)), 0.0)


def test_loss_error_is_an_invalid_argument_naming_the_field() -> None:
    err = LossError('batch.sequence_inputs["ref_logps"]', "is required by this loss")
    assert isinstance(err, InvalidArgument)
    assert err.field == 'batch.sequence_inputs["ref_logps"]'


# --- cross-entropy -----------------------------------------------------------------------------


def test_cross_entropy_value() -> None:
    out = cross_entropy(LossInputs(logprobs=leaf(LOGPROBS), mask=MASK))
    nll = (0.5 + 1.0 + 0.2 + 0.3 + 2.0) / 5
    assert_close(out.loss, nll)
    assert out.metrics["nll"] == pytest.approx(nll, abs=TOL)
    assert out.metrics["perplexity"] == pytest.approx(math.exp(nll), abs=TOL)
    assert out.num_tokens == 5


def test_cross_entropy_label_smoothing_value() -> None:
    mean_lp = t([[-3.0, -4.0, 0.0], [-5.0, -6.0, -7.0]])
    out = cross_entropy(
        LossInputs(logprobs=leaf(LOGPROBS), mask=MASK, mean_logprobs=mean_lp),
        label_smoothing=0.1,
    )
    nll = (0.5 + 1.0 + 0.2 + 0.3 + 2.0) / 5
    smooth = (3 + 4 + 5 + 6 + 7) / 5
    assert_close(out.loss, 0.9 * nll + 0.1 * smooth)
    assert out.metrics["nll"] == pytest.approx(nll, abs=TOL)


def test_cross_entropy_gradient() -> None:
    lp = leaf(LOGPROBS)
    mean_lp = leaf([[-3.0, -4.0, 0.0], [-5.0, -6.0, -7.0]])
    out = cross_entropy(
        LossInputs(logprobs=lp, mask=MASK, mean_logprobs=mean_lp), label_smoothing=0.25
    )
    written = ((0.75 * -lp + 0.25 * -mean_lp) * MASK).sum() / MASK.sum()
    for got, want in zip(
        grad_of(out.loss, lp, mean_lp), grad_of(written, lp, mean_lp), strict=True
    ):
        assert_close(got, want)


def test_cross_entropy_ignores_padding() -> None:
    mean_lp = t([[-3.0, -4.0, 0.0], [-5.0, -6.0, -7.0]])
    clean = cross_entropy(
        LossInputs(logprobs=t(LOGPROBS), mask=MASK, mean_logprobs=mean_lp), label_smoothing=0.1
    )
    lp = leaf(with_padding(t(LOGPROBS), MASK, float("nan")).tolist())
    dirty = cross_entropy(
        LossInputs(logprobs=lp, mask=MASK, mean_logprobs=with_padding(mean_lp, MASK, float("inf"))),
        label_smoothing=0.1,
    )
    assert_close(dirty.loss, clean.loss)
    assert_close(grad_of(dirty.loss, lp)[0], MASK * 0.9 * -1 / 5)


def test_cross_entropy_missing_inputs() -> None:
    with pytest.raises(LossError) as err:
        cross_entropy(LossInputs(logprobs=None, mask=MASK))
    assert err.value.field == "batch.logprobs"
    with pytest.raises(LossError) as err:
        cross_entropy(LossInputs(logprobs=t(LOGPROBS), mask=None))
    assert err.value.field == "batch.mask"
    with pytest.raises(LossError) as err:
        cross_entropy(LossInputs(logprobs=t(LOGPROBS), mask=MASK), label_smoothing=0.1)
    assert err.value.field == "batch.mean_logprobs"
    with pytest.raises(LossError) as err:
        cross_entropy(LossInputs(logprobs=t(LOGPROBS), mask=MASK[:, :2]))
    assert err.value.field == "batch.mask"


# --- Bradley-Terry -----------------------------------------------------------------------------

# P = 3 pairs: chosen rows first, then rejected.
BT_REWARDS = [1.0, 0.5, -0.2, 0.0, 1.5, -1.0]
BT_MARGINS = [0.5, 0.0, 1.0]


def test_bradley_terry_value() -> None:
    out = bradley_terry(LossInputs(logprobs=None, mask=None, rewards=leaf(BT_REWARDS)))
    diffs = [1.0 - 0.0, 0.5 - 1.5, -0.2 - -1.0]
    assert_close(out.loss, sum(-log_sigmoid(d) for d in diffs) / 3)
    assert out.metrics["accuracy"] == pytest.approx(2 / 3)
    assert out.metrics["margin"] == pytest.approx(sum(diffs) / 3, abs=TOL)
    assert out.metrics["reward_chosen"] == pytest.approx((1.0 + 0.5 - 0.2) / 3, abs=TOL)
    assert out.metrics["reward_rejected"] == pytest.approx((0.0 + 1.5 - 1.0) / 3, abs=TOL)
    assert out.num_tokens == 6


def test_bradley_terry_margin_and_centering_value() -> None:
    out = bradley_terry(
        LossInputs(
            logprobs=None,
            mask=None,
            rewards=leaf(BT_REWARDS),
            sequence_inputs={"margins": t(BT_MARGINS)},
        ),
        center_rewards_coefficient=0.01,
    )
    pairs = [(1.0, 0.0, 0.5), (0.5, 1.5, 0.0), (-0.2, -1.0, 1.0)]
    bt = sum(-log_sigmoid(c - r - m) for c, r, m in pairs) / 3
    center = sum((c + r) ** 2 for c, r, _ in pairs) / 3
    assert_close(out.loss, bt + 0.01 * center)


def test_bradley_terry_gradient() -> None:
    r = leaf(BT_REWARDS)
    m = t(BT_MARGINS)
    out = bradley_terry(
        LossInputs(logprobs=None, mask=None, rewards=r, sequence_inputs={"margins": m}),
        center_rewards_coefficient=0.01,
    )
    chosen, rejected = r[:3], r[3:]
    written = (-torch.log(torch.sigmoid(chosen - rejected - m))).mean() + 0.01 * (
        (chosen + rejected) ** 2
    ).mean()
    assert_close(grad_of(out.loss, r)[0], grad_of(written, r)[0])


def test_bradley_terry_ignores_token_tensors() -> None:
    """A sequence loss: whatever rides in the token fields leaves it unchanged."""
    clean = bradley_terry(LossInputs(logprobs=None, mask=None, rewards=t(BT_REWARDS)))
    dirty = bradley_terry(LossInputs(logprobs=t(LOGPROBS), mask=MASK, rewards=t(BT_REWARDS)))
    assert_close(dirty.loss, clean.loss)


def test_bradley_terry_errors() -> None:
    with pytest.raises(LossError) as err:
        bradley_terry(LossInputs(logprobs=None, mask=None))
    assert err.value.field == "batch.rewards"
    with pytest.raises(LossError) as err:
        bradley_terry(LossInputs(logprobs=None, mask=None, rewards=t([1.0, 2.0, 3.0])))
    assert err.value.field == "batch.rewards"
    assert "3 rows" in err.value.message
    with pytest.raises(LossError) as err:
        bradley_terry(
            LossInputs(
                logprobs=None,
                mask=None,
                rewards=t(BT_REWARDS),
                sequence_inputs={"margins": t([1.0])},
            )
        )
    assert err.value.field == 'batch.sequence_inputs["margins"]'


# --- DPO ---------------------------------------------------------------------------------------

# P = 2 pairs, (4, 3): rows 0-1 chosen, rows 2-3 rejected; token counts 2, 3, 1, 2.
DPO_MASK = t([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
DPO_LOGPROBS = [
    [-0.5, -1.0, 0.0],
    [-0.2, -0.3, -0.4],
    [-2.0, 0.0, 0.0],
    [-0.1, -0.6, 0.0],
]
DPO_REF = [-1.2, -1.5, -1.0, -1.5]
# Summed policy log-probabilities of the rows: -1.5, -0.9, -2.0, -0.7.
DPO_POLICY = [-1.5, -0.9, -2.0, -0.7]
DPO_COUNTS = [2, 3, 1, 2]


def dpo_inputs(logprobs=None, mask=DPO_MASK, ref=DPO_REF) -> LossInputs:
    return LossInputs(
        logprobs=leaf(DPO_LOGPROBS) if logprobs is None else logprobs,
        mask=mask,
        sequence_inputs={"ref_logps": t(ref)},
    )


def dpo_margins(average: bool = False) -> list[float]:
    """h of each pair, from the summed (or per-token averaged) log-ratios."""
    n = DPO_COUNTS if average else [1, 1, 1, 1]
    ratio = [(DPO_POLICY[i] - DPO_REF[i]) / n[i] for i in range(4)]
    return [ratio[0] - ratio[2], ratio[1] - ratio[3]]


@pytest.mark.parametrize(
    ("variant", "beta", "eps", "per_pair"),
    [
        ("sigmoid", 0.1, 0.0, lambda h, b, e: -log_sigmoid(b * h)),
        (
            "sigmoid",
            0.5,
            0.2,
            lambda h, b, e: -log_sigmoid(b * h) * (1 - e) - log_sigmoid(-b * h) * e,
        ),
        ("hinge", 0.5, 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
        ("hinge", 5.0, 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
        (
            "robust",
            0.5,
            0.2,
            lambda h, b, e: (-log_sigmoid(b * h) * (1 - e) + log_sigmoid(-b * h) * e) / (1 - 2 * e),
        ),
    ],
)
def test_dpo_value(variant, beta, eps, per_pair) -> None:
    out = dpo(dpo_inputs(), variant=variant, beta=beta, label_smoothing=eps)
    h = dpo_margins()
    assert h == pytest.approx([0.7, -0.2])
    assert_close(out.loss, sum(per_pair(x, beta, eps) for x in h) / 2)
    rewards = [beta * (DPO_POLICY[i] - DPO_REF[i]) for i in range(4)]
    assert out.metrics["rewards_chosen"] == pytest.approx((rewards[0] + rewards[1]) / 2, abs=TOL)
    assert out.metrics["rewards_rejected"] == pytest.approx((rewards[2] + rewards[3]) / 2, abs=TOL)
    assert out.metrics["margin"] == pytest.approx(beta * sum(h) / 2, abs=TOL)
    assert out.metrics["accuracy"] == pytest.approx(0.5)
    assert out.metrics["logps_chosen"] == pytest.approx((-1.5 - 0.9) / 2, abs=TOL)
    assert out.metrics["logps_rejected"] == pytest.approx((-2.0 - 0.7) / 2, abs=TOL)
    assert out.num_tokens == 4


def test_dpo_ipo_uses_per_token_averages() -> None:
    beta = 0.1
    out = dpo(dpo_inputs(), variant="ipo", beta=beta)
    h = [
        (-1.5 - -1.2) / 2 - (-2.0 - -1.0) / 1,
        (-0.9 - -1.5) / 3 - (-0.7 - -1.5) / 2,
    ]
    assert h == pytest.approx(dpo_margins(average=True))
    assert_close(out.loss, sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2)
    assert out.metrics["logps_chosen"] == pytest.approx((-1.5 / 2 + -0.9 / 3) / 2, abs=TOL)


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_gradient(variant) -> None:
    beta, eps = 0.5, (0.2 if variant in ("sigmoid", "robust") else 0.0)
    lp = leaf(DPO_LOGPROBS)
    out = dpo(dpo_inputs(lp), variant=variant, beta=beta, label_smoothing=eps)

    ref = t(DPO_REF)
    policy = (lp * DPO_MASK).sum(-1)
    if variant == "ipo":
        n = DPO_MASK.sum(-1)
        policy, ref = policy / n, ref / n
    h = (policy[:2] - ref[:2]) - (policy[2:] - ref[2:])
    if variant == "sigmoid":
        per_pair = (
            -torch.log(torch.sigmoid(beta * h)) * (1 - eps)
            - torch.log(torch.sigmoid(-beta * h)) * eps
        )
    elif variant == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    elif variant == "hinge":
        per_pair = torch.clamp(1 - beta * h, min=0)
    else:
        per_pair = (
            -torch.log(torch.sigmoid(beta * h)) * (1 - eps)
            + torch.log(torch.sigmoid(-beta * h)) * eps
        ) / (1 - 2 * eps)
    written = per_pair.mean()
    assert_close(out.loss, written)
    assert_close(grad_of(out.loss, lp)[0], grad_of(written, lp)[0])


@pytest.mark.parametrize("variant", ["sigmoid", "ipo"])
def test_dpo_ignores_padding(variant) -> None:
    clean = dpo(dpo_inputs(t(DPO_LOGPROBS)), variant=variant)
    lp = leaf(with_padding(t(DPO_LOGPROBS), DPO_MASK, -7.0).tolist())
    dirty = dpo(dpo_inputs(lp), variant=variant)
    assert_close(dirty.loss, clean.loss)
    assert (grad_of(dirty.loss, lp)[0][~DPO_MASK.bool()] == 0).all()


def test_dpo_errors() -> None:
    with pytest.raises(LossError) as err:
        dpo(LossInputs(logprobs=t(DPO_LOGPROBS), mask=DPO_MASK))
    assert err.value.field == 'batch.sequence_inputs["ref_logps"]'
    with pytest.raises(LossError) as err:
        dpo(dpo_inputs(ref=DPO_REF[:3]))
    assert err.value.field == 'batch.sequence_inputs["ref_logps"]'
    with pytest.raises(LossError) as err:
        dpo(dpo_inputs(t(DPO_LOGPROBS[:3]), mask=DPO_MASK[:3], ref=DPO_REF[:3]))
    assert err.value.field == "batch.logprobs"
    assert "3 rows" in err.value.message
    empty_row = DPO_MASK.clone()
    empty_row[2] = 0
    with pytest.raises(LossError) as err:
        dpo(dpo_inputs(mask=empty_row), variant="ipo")
    assert err.value.field == "batch.mask"
    with pytest.raises(ValueError):
        dpo(dpo_inputs(), variant="orpo")


# --- KTO ---------------------------------------------------------------------------------------

# (5, 2): two desirable rows, one undesirable, two KL rows (whose labels are ignored).
KTO_MASK = t([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1]])
KTO_LOGPROBS = [[-0.5, -1.0], [-0.3, 0.0], [-2.0, -0.5], [-0.4, 0.0], [-1.0, -1.0]]
KTO_POLICY = [-1.5, -0.3, -2.5, -0.4, -2.0]
KTO_REF = [-1.0, -0.8, -2.0, -1.0, -2.5]
KTO_LABELS = [1.0, 1.0, 0.0, 0.0, 1.0]
KTO_KL_ROWS = [0.0, 0.0, 0.0, 1.0, 1.0]


def kto_inputs(logprobs=None, mask=KTO_MASK, kl_rows=KTO_KL_ROWS, drop=()) -> LossInputs:
    seq = {"ref_logps": t(KTO_REF), "labels": t(KTO_LABELS), "kl_rows": t(kl_rows)}
    return LossInputs(
        logprobs=leaf(KTO_LOGPROBS) if logprobs is None else logprobs,
        mask=mask,
        sequence_inputs={k: v for k, v in seq.items() if k not in drop},
    )


def test_kto_value() -> None:
    beta, wd, wu = 0.5, 1.0, 1.5
    out = kto(kto_inputs(), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    ratios = [p - r for p, r in zip(KTO_POLICY, KTO_REF, strict=True)]  # -0.5, 0.5, -0.5, 0.6, 0.5
    z = max(0.0, (ratios[3] + ratios[4]) / 2)
    chosen = [wd * (1 - sigmoid(beta * (ratios[i] - z))) for i in (0, 1)]
    rejected = [wu * (1 - sigmoid(beta * (z - ratios[2])))]
    assert_close(out.loss, sum(chosen + rejected) / 3)
    assert out.metrics["kl"] == pytest.approx(0.55, abs=TOL)
    assert out.metrics["rewards_chosen"] == pytest.approx(beta * (-0.5 + 0.5) / 2, abs=TOL)
    assert out.metrics["rewards_rejected"] == pytest.approx(beta * -0.5, abs=TOL)
    assert out.num_tokens == 3


def test_kto_reference_point_is_clamped_at_zero() -> None:
    """KL rows whose mean log-ratio is negative give z = 0; without KL rows z = 0 too."""
    inputs = kto_inputs(kl_rows=[0.0, 0.0, 0.0, 1.0, 0.0])  # row 4 is now desirable
    inputs.sequence_inputs["ref_logps"] = t([-1.0, -0.8, -2.0, 0.0, -2.5])  # row 3: π − ref = −0.4
    out = kto(inputs, beta=0.5)
    ratios = [-0.5, 0.5, -0.5, -0.4, 0.5]
    expected = [1 - sigmoid(0.5 * ratios[i]) for i in (0, 1, 4)] + [1 - sigmoid(0.5 * 0.5)]
    assert_close(out.loss, sum(expected) / 4)
    assert out.metrics["kl"] == 0.0
    no_kl = kto(kto_inputs(kl_rows=[0.0] * 5), beta=0.5)
    assert no_kl.metrics["kl"] == 0.0
    assert no_kl.num_tokens == 5


def test_kto_gradient_does_not_flow_through_the_reference_point() -> None:
    beta, wd, wu = 0.5, 1.0, 1.5
    lp = leaf(KTO_LOGPROBS)
    out = kto(kto_inputs(lp), beta=beta, desirable_weight=wd, undesirable_weight=wu)

    ratios = (lp * KTO_MASK).sum(-1) - t(KTO_REF)
    z = ratios[3:].mean().clamp(min=0).detach()
    written = torch.cat(
        (
            wd * (1 - torch.sigmoid(beta * (ratios[:2] - z))),
            wu * (1 - torch.sigmoid(beta * (z - ratios[2:3]))),
        )
    ).mean()
    assert_close(out.loss, written)
    g = grad_of(out.loss, lp)[0]
    assert_close(g, grad_of(written, lp)[0])
    assert (g[3:] == 0).all()


def test_kto_ignores_padding() -> None:
    clean = kto(kto_inputs(t(KTO_LOGPROBS)))
    dirty = kto(kto_inputs(with_padding(t(KTO_LOGPROBS), KTO_MASK, float("-inf"))))
    assert_close(dirty.loss, clean.loss)
    assert dirty.metrics == clean.metrics


@pytest.mark.parametrize("key", ["ref_logps", "labels", "kl_rows"])
def test_kto_missing_inputs(key) -> None:
    with pytest.raises(LossError) as err:
        kto(kto_inputs(drop=(key,)))
    assert err.value.field == f'batch.sequence_inputs["{key}"]'


def test_kto_malformed_inputs() -> None:
    with pytest.raises(LossError) as err:
        kto(kto_inputs(kl_rows=[1.0] * 5))
    assert err.value.field == 'batch.sequence_inputs["kl_rows"]'
    inputs = kto_inputs()
    inputs.sequence_inputs["labels"] = t([1.0, 2.0, 0.0, 0.0, 1.0])
    with pytest.raises(LossError) as err:
        kto(inputs)
    assert err.value.field == 'batch.sequence_inputs["labels"]'


# --- PPO ---------------------------------------------------------------------------------------

# (2, 3) with MASK. Log-ratios 0.1, 0, 0.3, 0, -0.3: token (1, 0) has r = e^0.3 > 1.2 with
# A > 0 and token (1, 2) has r = e^-0.3 < 0.8 with A < 0, so both take the clipped branch.
PPO_TOKENS = {
    "old_logprobs": [[-0.6, -1.0, 0.0], [-0.5, -0.3, -1.7]],
    "advantages": [[1.0, -0.5, 0.0], [2.0, 0.3, -1.0]],
    "returns": [[1.0, 0.0, 0.0], [0.8, -1.0, 0.0]],
    "old_values": [[0.4, 0.5, 0.0], [0.5, -0.4, 0.3]],
}
PPO_VALUES = [[0.5, 0.2, 0.0], [1.0, -0.5, 0.3]]
PPO_ENTROPY = [[1.5, 0.5, 0.0], [2.0, 1.0, 0.25]]
COUNTED = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def ppo_inputs(logprobs=None, values=None, entropy=None, drop=(), fill=None) -> LossInputs:
    tokens = {k: t(v) for k, v in PPO_TOKENS.items() if k not in drop}
    if fill is not None:
        tokens = {k: with_padding(v, MASK, fill) for k, v in tokens.items()}
    return LossInputs(
        logprobs=leaf(LOGPROBS) if logprobs is None else logprobs,
        mask=MASK,
        values=values,
        entropy=entropy,
        token_inputs=tokens,
    )


def test_ppo_value_with_clipping_active() -> None:
    eps, eps_v, c_vf, c_ent = 0.2, 0.2, 0.1, 0.01
    out = ppo(
        ppo_inputs(values=leaf(PPO_VALUES), entropy=t(PPO_ENTROPY)),
        clip_range=eps,
        value_clip_range=eps_v,
        vf_coef=c_vf,
        entropy_coef=c_ent,
    )
    pg, vf, ent, kl = [], [], [], []
    for i, j in COUNTED:
        r = math.exp(LOGPROBS[i][j] - PPO_TOKENS["old_logprobs"][i][j])
        a = PPO_TOKENS["advantages"][i][j]
        pg.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
        v, v_old, ret = (
            PPO_VALUES[i][j],
            PPO_TOKENS["old_values"][i][j],
            PPO_TOKENS["returns"][i][j],
        )
        v_clipped = v_old + min(max(v - v_old, -eps_v), eps_v)
        vf.append(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2))
        ent.append(PPO_ENTROPY[i][j])
        kl.append((LOGPROBS[i][j] - PPO_TOKENS["old_logprobs"][i][j]) ** 2)
    # The clipped branch wins on exactly the two tokens outside [0.8, 1.2].
    assert pg[2] == pytest.approx(-2.0 * 1.2) and pg[4] == pytest.approx(1.0 * 0.8)
    assert_close(out.loss, sum(pg) / 5 + c_vf * sum(vf) / 5 - c_ent * sum(ent) / 5)
    assert out.metrics["policy_loss"] == pytest.approx(sum(pg) / 5, abs=TOL)
    assert out.metrics["value_loss"] == pytest.approx(sum(vf) / 5, abs=TOL)
    assert out.metrics["entropy"] == pytest.approx(sum(ent) / 5, abs=TOL)
    assert out.metrics["approx_kl"] == pytest.approx(0.5 * sum(kl) / 5, abs=TOL)
    assert out.metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert out.metrics["value_clip_fraction"] == pytest.approx(1 / 5)  # token (0, 1)
    assert out.num_tokens == 5


def ppo_written(lp, values, entropy, eps, eps_v, c_vf, c_ent, weights=1.0) -> torch.Tensor:
    tok = {k: t(v) for k, v in PPO_TOKENS.items()}
    adv, ret, v_old = tok["advantages"], tok["returns"], tok["old_values"]
    ratio = torch.exp(lp - tok["old_logprobs"])
    pg = weights * torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps))
    v_clipped = v_old + torch.clamp(values - v_old, -eps_v, eps_v)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clipped - ret) ** 2)
    n = MASK.sum()
    return (pg * MASK).sum() / n + c_vf * (vf * MASK).sum() / n - c_ent * (entropy * MASK).sum() / n


def test_ppo_gradient() -> None:
    args = (0.2, 0.2, 0.1, 0.01)
    lp, values, entropy = leaf(LOGPROBS), leaf(PPO_VALUES), leaf(PPO_ENTROPY)
    out = ppo(ppo_inputs(lp, values, entropy), *args)
    written = ppo_written(lp, values, entropy, *args)
    got = grad_of(out.loss, lp, values, entropy)
    want = grad_of(written, lp, values, entropy)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert got[0][1, 0] == 0 and got[0][1, 2] == 0  # clipped tokens pass no policy gradient


def test_ppo_ignores_padding() -> None:
    clean = ppo(ppo_inputs(t(LOGPROBS), t(PPO_VALUES), t(PPO_ENTROPY)), entropy_coef=0.01)
    lp = leaf(with_padding(t(LOGPROBS), MASK, float("nan")).tolist())
    values = leaf(with_padding(t(PPO_VALUES), MASK, float("nan")).tolist())
    dirty = ppo(
        ppo_inputs(lp, values, with_padding(t(PPO_ENTROPY), MASK, 9.0), fill=float("nan")),
        entropy_coef=0.01,
    )
    assert_close(dirty.loss, clean.loss)
    assert dirty.metrics == pytest.approx(clean.metrics)
    for g in grad_of(dirty.loss, lp, values):
        assert (g[~MASK.bool()] == 0).all()


@pytest.mark.parametrize("key", ["old_logprobs", "advantages", "returns", "old_values"])
def test_ppo_missing_token_inputs(key) -> None:
    with pytest.raises(LossError) as err:
        ppo(ppo_inputs(values=t(PPO_VALUES), drop=(key,)))
    assert err.value.field == f'batch.token_inputs["{key}"]'


def test_ppo_errors() -> None:
    with pytest.raises(LossError) as err:
        ppo(ppo_inputs())
    assert err.value.field == "batch.values"
    with pytest.raises(LossError) as err:
        ppo(ppo_inputs(values=t(PPO_VALUES)), entropy_coef=0.01)
    assert err.value.field == "batch.entropy"
    inputs = ppo_inputs(values=t(PPO_VALUES))
    inputs.token_inputs["advantages"] = t([[1.0, float("nan"), 0.0], [2.0, 0.3, -1.0]])
    with pytest.raises(LossError) as err:
        ppo(inputs)
    assert err.value.field == 'batch.token_inputs["advantages"]'


# --- policy gradient ---------------------------------------------------------------------------

# (2, 3) with MASK; log-ratios to old 0.1, 0, 0.3, 0, -0.3 as in the PPO case.
PG_OLD = PPO_TOKENS["old_logprobs"]
PG_ADV = PPO_TOKENS["advantages"]
PG_REF = [[-0.7, -0.8, 0.0], [-0.2, -0.5, -1.5]]


def pg_inputs(logprobs=None, keys=("advantages",), fill=None) -> LossInputs:
    given = {"advantages": PG_ADV, "old_logprobs": PG_OLD, "ref_logprobs": PG_REF}
    tokens = {k: t(given[k]) for k in keys}
    if fill is not None:
        tokens = {k: with_padding(v, MASK, fill) for k, v in tokens.items()}
    return LossInputs(
        logprobs=leaf(LOGPROBS) if logprobs is None else logprobs, mask=MASK, token_inputs=tokens
    )


def pg_by_hand(clip, kl_coef, old=True) -> tuple[list[list[float]], list[list[float]]]:
    """Per-row lists of (L, k3) at counted tokens."""
    losses, k3s = [[], []], [[], []]
    for i, j in COUNTED:
        lp, a = LOGPROBS[i][j], PG_ADV[i][j]
        r = math.exp(lp - PG_OLD[i][j]) if old else 1.0
        loss = -a * r
        if clip is not None:
            loss = max(loss, -a * min(max(r, 1 - clip), 1 + clip))
        d = PG_REF[i][j] - lp
        losses[i].append(loss)
        k3s[i].append(math.exp(d) - d - 1)
    return losses, k3s


def test_policy_gradient_reinforce_value() -> None:
    """Without old log-probabilities the ratio is 1: the loss is −mean(A)."""
    out = policy_gradient(pg_inputs())
    assert_close(out.loss, -(1.0 - 0.5 + 2.0 + 0.3 - 1.0) / 5)
    assert out.metrics == pytest.approx({"policy_loss": -(1.0 - 0.5 + 2.0 + 0.3 - 1.0) / 5})
    assert out.num_tokens == 5


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_policy_gradient_value(aggregation, clip) -> None:
    beta = 0.05
    out = policy_gradient(
        pg_inputs(keys=("advantages", "old_logprobs", "ref_logprobs")),
        clip_range=clip,
        kl_coef=beta,
        aggregation=aggregation,
    )
    losses, k3s = pg_by_hand(clip, beta)
    per_token = [
        [x + beta * k for x, k in zip(xs, ks, strict=True)]
        for xs, ks in zip(losses, k3s, strict=True)
    ]
    if aggregation == "token_mean":
        expected = sum(sum(row) for row in per_token) / 5
        policy = sum(sum(row) for row in losses) / 5
    else:
        expected = (sum(per_token[0]) / 2 + sum(per_token[1]) / 3) / 2
        policy = (sum(losses[0]) / 2 + sum(losses[1]) / 3) / 2
    assert_close(out.loss, expected)
    assert out.metrics["policy_loss"] == pytest.approx(policy, abs=TOL)
    assert out.metrics["kl"] == pytest.approx(sum(sum(row) for row in k3s) / 5, abs=TOL)
    if clip is None:
        assert "clip_fraction" not in out.metrics
    else:
        assert out.metrics["clip_fraction"] == pytest.approx(2 / 5)
        assert losses[1][0] == pytest.approx(-2.0 * 1.2)  # the clipped branch is taken


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize(
    ("keys", "clip"),
    [(("advantages",), None), (("advantages", "old_logprobs", "ref_logprobs"), 0.2)],
)
def test_policy_gradient_gradient(aggregation, keys, clip) -> None:
    beta = 0.05 if "ref_logprobs" in keys else 0.0
    lp = leaf(LOGPROBS)
    out = policy_gradient(
        pg_inputs(lp, keys), clip_range=clip, kl_coef=beta, aggregation=aggregation
    )

    adv = t(PG_ADV)
    old = t(PG_OLD) if "old_logprobs" in keys else lp.detach()
    ratio = torch.exp(lp - old)
    per_token = -adv * ratio
    if clip is not None:
        per_token = torch.maximum(per_token, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    if beta:
        d = t(PG_REF) - lp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    if aggregation == "token_mean":
        written = (per_token * MASK).sum() / MASK.sum()
    else:
        written = ((per_token * MASK).sum(-1) / MASK.sum(-1)).mean()
    assert_close(out.loss, written)
    assert_close(grad_of(out.loss, lp)[0], grad_of(written, lp)[0])


def test_policy_gradient_without_old_logprobs_is_reinforce() -> None:
    """The gradient is −A·∇log π per token, mean-reduced."""
    lp = leaf(LOGPROBS)
    out = policy_gradient(pg_inputs(lp))
    assert_close(grad_of(out.loss, lp)[0], -t(PG_ADV) * MASK / 5)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_policy_gradient_ignores_padding(aggregation) -> None:
    keys = ("advantages", "old_logprobs", "ref_logprobs")
    clean = policy_gradient(
        pg_inputs(t(LOGPROBS), keys), clip_range=0.2, kl_coef=0.05, aggregation=aggregation
    )
    lp = leaf(with_padding(t(LOGPROBS), MASK, float("nan")).tolist())
    dirty = policy_gradient(
        pg_inputs(lp, keys, fill=float("inf")),
        clip_range=0.2,
        kl_coef=0.05,
        aggregation=aggregation,
    )
    assert_close(dirty.loss, clean.loss)
    assert dirty.metrics == pytest.approx(clean.metrics)
    assert (grad_of(dirty.loss, lp)[0][~MASK.bool()] == 0).all()


def test_policy_gradient_errors() -> None:
    with pytest.raises(LossError) as err:
        policy_gradient(pg_inputs(keys=()))
    assert err.value.field == 'batch.token_inputs["advantages"]'
    with pytest.raises(LossError) as err:
        policy_gradient(pg_inputs(), kl_coef=0.1)
    assert err.value.field == 'batch.token_inputs["ref_logprobs"]'
    inputs = pg_inputs()
    inputs.token_inputs["advantages"] = t([[1.0, float("inf"), 0.0], [2.0, 0.3, -1.0]])
    with pytest.raises(LossError, match="must be finite") as err:
        policy_gradient(inputs)
    assert err.value.field == 'batch.token_inputs["advantages"]'
    with pytest.raises(LossError) as err:
        policy_gradient(LossInputs(logprobs=t(LOGPROBS), mask=torch.zeros_like(MASK)))
    assert err.value.field == "batch.mask"


# --- truncated importance weights (off-policy samples) ----------------------------------------

# π_old / π_behaviour at the counted tokens: 1, 1.5, 3 (truncated to C = 2), 0.5, e^0.2.
IS_RAW = [1.0, 1.5, 3.0, 0.5, math.exp(0.2)]
IS_WEIGHTS = [1.0, 1.5, 2.0, 0.5, math.exp(0.2)]
BEHAVIOUR = [[-0.6, -1.0 - math.log(1.5), 0.0], [-0.5 - math.log(3.0), -0.3 + math.log(2.0), -1.9]]
IS_METRICS = {
    "is_weight/mean": sum(IS_WEIGHTS) / 5,
    "is_weight/max": 2.0,
    "is_weight/clipped_fraction": 1 / 5,
}


def test_behaviour_logprobs_are_the_ratios_written_out() -> None:
    for (i, j), raw in zip(COUNTED, IS_RAW, strict=True):
        assert math.exp(PPO_TOKENS["old_logprobs"][i][j] - BEHAVIOUR[i][j]) == pytest.approx(raw)


def test_ppo_weights_its_policy_term_by_the_truncated_importance_ratio() -> None:
    eps, eps_v, c_vf = 0.2, 0.2, 0.1
    inputs = ppo_inputs(values=leaf(PPO_VALUES))
    inputs.token_inputs["behaviour_logprobs"] = t(BEHAVIOUR)
    out = ppo(inputs, clip_range=eps, value_clip_range=eps_v, vf_coef=c_vf, is_cap=2.0)
    pg, vf = [], []
    for (i, j), w in zip(COUNTED, IS_WEIGHTS, strict=True):
        r = math.exp(LOGPROBS[i][j] - PPO_TOKENS["old_logprobs"][i][j])
        a = PPO_TOKENS["advantages"][i][j]
        pg.append(w * max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
        v, v_old = PPO_VALUES[i][j], PPO_TOKENS["old_values"][i][j]
        ret = PPO_TOKENS["returns"][i][j]
        v_clipped = v_old + min(max(v - v_old, -eps_v), eps_v)
        vf.append(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2))  # not weighted
    assert_close(out.loss, sum(pg) / 5 + c_vf * sum(vf) / 5)
    assert out.metrics["policy_loss"] == pytest.approx(sum(pg) / 5, abs=TOL)
    assert {k: out.metrics[k] for k in IS_METRICS} == pytest.approx(IS_METRICS, abs=TOL)
    # A higher cap lets the third token's weight through untruncated.
    loose = ppo(inputs, clip_range=eps, value_clip_range=eps_v, vf_coef=c_vf, is_cap=4.0)
    assert loose.metrics["is_weight/max"] == pytest.approx(3.0)
    assert loose.metrics["is_weight/clipped_fraction"] == 0.0
    # Without behaviour log-probs there is no weight (w = 1) and no metric.
    plain = ppo(ppo_inputs(values=leaf(PPO_VALUES)), clip_range=eps, vf_coef=c_vf)
    assert not any(k.startswith("is_weight/") for k in plain.metrics)


def is_weights() -> torch.Tensor:
    """IS_WEIGHTS at the counted tokens of a (2, 3) tensor, 0 elsewhere."""
    weights = torch.zeros_like(MASK)
    for (i, j), w in zip(COUNTED, IS_WEIGHTS, strict=True):
        weights[i, j] = w
    return weights


def test_the_importance_weight_is_a_constant_of_the_gradient() -> None:
    lp, values, entropy = leaf(LOGPROBS), leaf(PPO_VALUES), leaf(PPO_ENTROPY)
    inputs = ppo_inputs(lp, values, entropy)
    inputs.token_inputs["behaviour_logprobs"] = t(BEHAVIOUR)
    out = ppo(inputs, 0.2, 0.2, 0.1, 0.01)
    written = ppo_written(lp, values, entropy, 0.2, 0.2, 0.1, 0.01, weights=is_weights())
    got, want = grad_of(out.loss, lp, values, entropy), grad_of(written, lp, values, entropy)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_policy_gradient_weights_its_policy_term_not_its_kl(aggregation) -> None:
    beta, clip = 0.05, 0.2
    lp = leaf(LOGPROBS)
    inputs = pg_inputs(lp, keys=("advantages", "old_logprobs", "ref_logprobs"))
    inputs.token_inputs["behaviour_logprobs"] = t(BEHAVIOUR)
    out = policy_gradient(inputs, clip_range=clip, kl_coef=beta, aggregation=aggregation)
    losses, k3s = pg_by_hand(clip, beta)
    weights = [IS_WEIGHTS[:2], IS_WEIGHTS[2:]]
    per_token = [
        [w * x + beta * k for w, x, k in zip(ws, xs, ks, strict=True)]
        for ws, xs, ks in zip(weights, losses, k3s, strict=True)
    ]
    if aggregation == "token_mean":
        expected = sum(sum(row) for row in per_token) / 5
    else:
        expected = (sum(per_token[0]) / 2 + sum(per_token[1]) / 3) / 2
    assert_close(out.loss, expected)
    assert {k: out.metrics[k] for k in IS_METRICS} == pytest.approx(IS_METRICS, abs=TOL)
    # Its gradient: w·∇(clipped surrogate) + β·∇k3, with w held constant.
    w = is_weights()
    ratio = torch.exp(lp - t(PG_OLD))
    adv, d = t(PG_ADV), t(PG_REF) - lp
    surrogate = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    written = w * surrogate + beta * (torch.exp(d) - d - 1)
    if aggregation == "token_mean":
        written = (written * MASK).sum() / MASK.sum()
    else:
        written = ((written * MASK).sum(-1) / MASK.sum(-1)).mean()
    assert_close(grad_of(out.loss, lp)[0], grad_of(written, lp)[0])


def test_importance_weights_ignore_padding_and_need_old_logprobs() -> None:
    keys = ("advantages", "old_logprobs")
    clean = pg_inputs(t(LOGPROBS), keys)
    clean.token_inputs["behaviour_logprobs"] = t(BEHAVIOUR)
    dirty = pg_inputs(t(LOGPROBS), keys, fill=float("nan"))
    dirty.token_inputs["behaviour_logprobs"] = with_padding(t(BEHAVIOUR), MASK, float("-inf"))
    a, b = policy_gradient(clean, clip_range=0.2), policy_gradient(dirty, clip_range=0.2)
    assert_close(b.loss, a.loss)
    assert b.metrics == pytest.approx(a.metrics)
    alone = pg_inputs(keys=("advantages",))
    alone.token_inputs["behaviour_logprobs"] = t(BEHAVIOUR)
    with pytest.raises(LossError, match="required with behaviour_logprobs") as err:
        policy_gradient(alone)
    assert err.value.field == 'batch.token_inputs["old_logprobs"]'
    broken = pg_inputs(keys=keys)
    broken.token_inputs["behaviour_logprobs"] = t([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(LossError, match="must be finite") as err:
        policy_gradient(broken)
    assert err.value.field == 'batch.token_inputs["behaviour_logprobs"]'


# --- registry ----------------------------------------------------------------------------------


def test_registry_names_every_loss() -> None:
    assert {
        "cross_entropy": cross_entropy,
        "bradley_terry": bradley_terry,
        "dpo": dpo,
        "kto": kto,
        "ppo": ppo,
        "policy_gradient": policy_gradient,
    } == LOSSES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_follow_the_input_dtype(dtype) -> None:
    lp = torch.tensor(LOGPROBS, dtype=dtype, requires_grad=True)
    mask = MASK.to(torch.float32)
    out = cross_entropy(LossInputs(logprobs=lp, mask=mask))
    assert out.loss.dtype == dtype
    out = policy_gradient(
        LossInputs(logprobs=lp, mask=mask, token_inputs={"advantages": t(PG_ADV).to(dtype)})
    )
    assert out.loss.dtype == dtype
    out.loss.backward()
    assert lp.grad is not None and lp.grad.dtype == dtype


# (ratio, advantage) per token: outside the clip range on the side where clipping binds
# (counted), outside where the unclipped term is the larger (not counted), and inside.
CLIP_CASES = [(1.5, 1.0), (1.5, -1.0), (0.5, -1.0), (0.5, 1.0), (1.0, 1.0)]


def _clip_inputs(**extra) -> LossInputs:
    ratios, advantages = zip(*CLIP_CASES, strict=True)
    old = [[-1.0] * len(CLIP_CASES)]
    new = [[-1.0 + math.log(r) for r in ratios]]
    return LossInputs(
        logprobs=leaf(new), mask=torch.ones(1, len(CLIP_CASES)),
        token_inputs={"old_logprobs": t(old), "advantages": t([list(advantages)]),
                      **{k: t(v) for k, v in extra.items()}},
    )  # fmt: skip


def test_clip_fraction_counts_the_tokens_where_clipping_changes_the_objective() -> None:
    """TRL (PPO ``pg_clipfrac``, GRPO ``clip_ratio``) and OpenRLHF count a token as clipped
    when the max picks the clipped term: r > 1 + ε with A > 0, or r < 1 − ε with A < 0 — two
    of the five tokens here. Four lie outside [0.8, 1.2] (``ratio_outside_fraction``)."""
    out = policy_gradient(_clip_inputs(), clip_range=0.2)
    assert out.metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert out.metrics["ratio_outside_fraction"] == pytest.approx(4 / 5)
    values = t([[0.0] * 5])
    ppo_out = ppo(
        LossInputs(logprobs=_clip_inputs().logprobs, mask=torch.ones(1, 5), values=values,
                   token_inputs={**_clip_inputs().token_inputs, "returns": t([[0.0] * 5]),
                                 "old_values": t([[0.0] * 5])}),
        clip_range=0.2,
    )  # fmt: skip
    assert ppo_out.metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert ppo_out.metrics["ratio_outside_fraction"] == pytest.approx(4 / 5)


def test_value_clip_fraction_counts_no_token_the_clip_leaves_alone() -> None:
    """V clamped to V_old ± ε_v itself: a value inside the range is exactly V, so no rounding
    of V_old + (V − V_old) counts it as clipped (1 000 random tokens, all inside: 0, where
    that rounding alone would count over 1 % of them). Outside,
    a token counts when the clipped term is the larger: V = 0.5 from V_old 0 (ε_v 0.2, so
    clipped to 0.2) with return 1.0 counts, the same V with return 0.0 does not."""
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(1, 1000, generator=generator) * 0.1).requires_grad_()
    old = values.detach() + (torch.rand(1, 1000, generator=generator) - 0.5) * 0.3  # |Δ| < 0.15
    returns = torch.randn(1, 1000, generator=generator) * 0.1
    rounded = old + torch.clamp(values.detach() - old, -0.2, 0.2)  # the usual way to write it
    assert ((rounded - returns) ** 2 > (values.detach() - returns) ** 2).float().mean() > 0.01
    zeros = torch.zeros(1, 1000)
    inside = ppo(
        LossInputs(logprobs=zeros.clone().requires_grad_(), mask=torch.ones(1, 1000),
                   values=values, token_inputs={"old_logprobs": zeros, "advantages": zeros,
                                                "returns": returns, "old_values": old}),
        value_clip_range=0.2,
    )  # fmt: skip
    assert inside.metrics["value_clip_fraction"] == 0.0
    edge = ppo(
        LossInputs(logprobs=leaf([[0.0, 0.0]]), mask=torch.ones(1, 2), values=leaf([[0.5, 0.5]]),
                   token_inputs={"old_logprobs": t([[0.0, 0.0]]), "advantages": t([[0.0, 0.0]]),
                                 "returns": t([[1.0, 0.0]]), "old_values": t([[0.0, 0.0]])}),
        value_clip_range=0.2,
    )  # fmt: skip
    # token 0: (0.5 − 1)² = 0.25 < (0.2 − 1)² = 0.64, clipped wins; token 1: 0.25 > 0.04
    assert edge.metrics["value_clip_fraction"] == pytest.approx(1 / 2)
    assert edge.metrics["value_loss"] == pytest.approx(0.5 * (0.64 + 0.25) / 2)
