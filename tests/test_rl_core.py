"""The RL maths against values computed by hand (each number in a comment is worked out beside it)."""

from __future__ import annotations

import math

import pytest
import torch

from spa_rl.rl.core import (
    aggregate,
    bi_level_gae,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    keep_most_varied_groups,
    kl_penalty,
    masked_whiten,
    policy_loss,
    preference_pairs,
    token_weights,
    truncated_is_weights,
    turn_ends,
    value_loss,
)

T = torch.tensor


def test_gae_skips_the_text_between_turns():
    """Two turns (tokens 0-1 and 4-5) with the user's text between them (2-3), the reward on the last token."""
    mask = T([[1, 1, 0, 0, 1, 1.0], [1, 1, 1, 0, 0, 0]])
    values = T([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4], [0.5, 0.25, 1.0, 0, 0, 0]])
    rewards = T([[0, 0, 0, 5.0, 0, 1.0], [0, 0, 2.0, 0, 0, 0]])  # the 5.0 sits on masked-out text: ignored
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = (sum of later rewards) - V(t)
    assert torch.allclose(adv, T([[0.9, 0.8, 0, 0, 0.7, 0.6], [1.5, 1.75, 1.0, 0, 0, 0]]))
    assert torch.allclose(ret, T([[1.0, 1.0, 0, 0, 1.0, 1.0], [2.0, 2.0, 2.0, 0, 0, 0]]))
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=0.5)
    # t5: 1 - 0.4 = 0.6 | t4: 0.5*0.4 - 0.3 = -0.1, -0.1 + 0.25*0.6 = 0.05
    # t1 (next masked token is t4): 0.5*0.3 - 0.2 = -0.05, -0.05 + 0.25*0.05 = -0.0375
    # t0: 0.5*0.2 - 0.1 = 0, 0 + 0.25*(-0.0375) = -0.009375
    assert torch.allclose(adv, T([[-0.009375, -0.0375, 0, 0, 0.05, 0.6]]))
    assert torch.allclose(ret, T([[0.090625, 0.1625, 0, 0, 0.35, 1.0]]))


def test_turn_ends_are_the_last_token_of_each_run():
    mask = T([[1, 1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0, 0]])
    assert turn_ends(mask).int().tolist() == [[0, 1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0]]


def test_bi_level_gae_by_hand():
    mask = T([[1, 1, 0, 1, 1.0]])  # turn 0: tokens 0-1, turn 1: tokens 3-4
    values = T([[0.1, 0.2, 7.0, 0.3, 0.4]])
    rewards = T([[0, 0.5, 0, 0, 1.0]])  # each turn's reward on its last token
    # lam = 1: turn 1: 1.0 - 0.4 = 0.6, G1 = 1.0; turn 0: 0.5 + 0.5*0.4 - 0.2 = 0.5, A0 = 0.5 + 0.5*0.6 = 0.8,
    # G0 = 1.0; inside each turn, gamma = lam = 1: A_t = G - V(t)
    adv, ret = bi_level_gae(rewards, values, mask, gamma=1.0, lam=1.0, turn_gamma=0.5)
    assert torch.allclose(adv, T([[0.9, 0.8, 0, 0.7, 0.6]]))
    assert torch.allclose(ret, T([[1.0, 1.0, 0, 1.0, 1.0]]))
    # lam = 0.5: turn 0: A = 0.5 + 0.5*0.5*0.6 = 0.65, G0 = 0.85; inside turn 0: t1: 0.85 - 0.2 = 0.65,
    # t0: 0.2 - 0.1 + 0.5*0.65 = 0.425; inside turn 1: t4: 0.6, t3: 0.4 - 0.3 + 0.5*0.6 = 0.4
    adv, ret = bi_level_gae(rewards, values, mask, gamma=1.0, lam=0.5, turn_gamma=0.5)
    assert torch.allclose(adv, T([[0.425, 0.65, 0, 0.4, 0.6]]))
    assert torch.allclose(ret, T([[0.525, 0.85, 0, 0.7, 1.0]]))


def test_bi_level_gae_with_one_turn_and_turn_gamma_one_is_plain_gae():
    mask = T([[0, 1, 1, 1, 0.0]])
    values, rewards = T([[0, 0.3, 0.1, 0.2, 0]]), T([[0, 0, 0, 1.0, 0]])
    for lam in (1.0, 0.7):
        a, r = bi_level_gae(rewards, values, mask, gamma=0.9, lam=lam, turn_gamma=1.0)
        b, s = gae(rewards, values, mask, gamma=0.9, lam=lam)
        assert torch.allclose(a, b) and torch.allclose(r, s)


def test_group_advantages():
    scores = T([1.0, 0.0, 0.0, 1.0, 5.0])
    groups = T([0, 0, 0, 0, 1])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 1 has one member: 0
    assert torch.allclose(group_advantages(scores, groups), T([0.866025, -0.866025, -0.866025, 0.866025, 0.0]),
                          atol=1e-5)
    assert torch.allclose(group_advantages(scores, groups, norm_by_std=False), T([0.5, -0.5, -0.5, 0.5, 0.0]))
    assert torch.equal(group_advantages(T([2.0, 2.0]), T([3, 3])), T([0.0, 0.0])), "no spread, no signal"


def test_keep_the_most_varied_groups():
    std = T([0.1, 0.5, 0.0, 0.5])
    assert keep_most_varied_groups(std, 0.5).tolist() == [1, 3]
    assert keep_most_varied_groups(std, 0.25).tolist() == [1], "ties go to the earlier group"
    assert keep_most_varied_groups(std, 0.01).tolist() == [1], "at least one"
    assert keep_most_varied_groups(std, 1.0).tolist() == [0, 1, 2, 3]


def _logps(ratios):
    old = torch.log(T([[0.5, 0.25, 0.2, 0.1]]))
    return old + torch.log(T([ratios])), old


def test_policy_loss_clips_asymmetrically_and_dual_clips():
    logp, old = _logps([1.5, 0.5, 1.1, 4.0])
    logp.requires_grad_(True)
    adv = T([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones_like(adv)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # token 0: max(-1.5, -1.28) = -1.28 (clipped at 1 + 0.28); token 1: max(-0.5, -0.8) = -0.5;
    # token 2: 1.1; token 3: max(4.0, 1.28) = 4.0, above the dual bound 3.0 -> 3.0
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 3.0) / 4)
    assert stats["clipfrac"].item() == 0.25 and stats["dual_clipfrac"].item() == 0.25
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0, "clipped tokens get no gradient"
    assert logp.grad[0, 1] == pytest.approx(-0.5 / 4) and logp.grad[0, 2] == pytest.approx(1.1 / 4)
    no_dual, _ = policy_loss(logp.detach(), old, adv, mask, dual_clip=None)
    assert no_dual.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 4.0) / 4)
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 4.0)) / 4
    assert stats["approx_kl"].item() == pytest.approx(kl, rel=1e-5)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    logp = torch.log(T([[0.3, 0.6, 0.9]]))
    adv, mask = T([[2.0, -1.0, 5.0]]), T([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-0.5) and stats["clipfrac"] == 0 and stats["approx_kl"] == 0


def test_truncated_importance_weights_by_hand():
    # the trainer's probabilities over the sampler's: 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.1 = 9 (capped at 2);
    # the last token was not sampled (mask 0): weight 1 whatever the ratio
    old, rollout = torch.log(T([[0.5, 0.2, 0.9, 0.9]])), torch.log(T([[0.25, 0.4, 0.1, 0.01]]))
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    old.requires_grad_(True)
    w, stats = truncated_is_weights(old, rollout, mask, cap=2.0)
    assert w.tolist()[0] == pytest.approx([2.0, 0.5, 2.0, 1.0]) and not w.requires_grad
    assert stats["tis_mean"].item() == pytest.approx(4.5 / 3) and stats["tis_clipfrac"].item() == pytest.approx(1 / 3)
    # weighting the advantages weights the clipped loss token by token (a positive constant per token)
    logp = old.detach() + T([[0.1, -0.1, 0.0, 0.0]])
    adv = T([[1.0, -1.0, 1.0, 1.0]])
    weighted, _ = policy_loss(logp, old.detach(), adv * w, mask, dual_clip=None, agg="token-mean")
    per_token = [max(-a * r, -a * min(max(r, 0.8), 1.28)) for a, r in ((1, math.exp(0.1)), (-1, math.exp(-0.1)),
                                                                       (1, 1.0))]
    assert weighted.item() == pytest.approx((2 * per_token[0] + 0.5 * per_token[1] + 2 * per_token[2]) / 3)


def test_value_loss_with_clipping():
    values, old, returns = T([[1.0, 2.0]]), T([[0.0, 2.0]]), T([[1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, torch.ones_like(values), clip=0.5)
    # token 0: (1-1)^2 = 0 vs clipped value 0.5: 0.25 -> 0.25; token 1: 4 vs 4 -> 4
    assert loss.item() == pytest.approx(0.5 * (0.25 + 4) / 2) and stats["clipfrac"].item() == 0.5
    plain, _ = value_loss(values, old, returns, torch.ones_like(values), clip=None)
    assert plain.item() == pytest.approx(0.5 * (0 + 4) / 2)


def test_aggregations():
    losses, mask = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]]), T([[1, 1, 1], [1, 0, 0], [0, 0, 0.0]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError):
        aggregate(losses, mask, "mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_token_weights_cut_into_micro_batches_sum_to_the_minibatch_aggregate(mode):
    """A minibatch of rows 0, 1, 3 (row 2 is another minibatch's), cut into micro-batches [0] and [1, 3]: the
    weighted sums of the two pieces add up to `aggregate` of the three rows; row 2 weighs nothing."""
    losses = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 5.0, 5.0], [7.0, 8.0, 0.0]])
    mask = T([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0.0]])
    rows = torch.tensor([0, 1, 3])
    tokens = mask[rows].sum(-1)
    w = token_weights(mask, rows, mode, float(tokens.sum()), float((tokens > 0).sum()))
    assert w[2].abs().sum() == 0
    pieces = sum(float((w[r] * losses[r]).sum()) for r in ([0], [1, 3]))
    assert pieces == pytest.approx(aggregate(losses[rows], mask[rows], mode).item())


def test_whitening_kl_entropy_and_explained_variance():
    x, mask = T([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]]), T([[1, 1, 0], [1, 0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, 2] == 0 and w[1, 1] == 0
    assert torch.allclose(w[mask.bool()], T([-1.0, 0.0, 1.0]), atol=1e-5)  # mean 2, unbiased std 1
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # e^-d + d - 1, d = ln 2
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert entropy_from_logits(T([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)
    returns, ones = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, ones).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, ones).item() == pytest.approx(0.0)


def test_whitening_keeps_a_small_spread_far_from_zero():
    """Advantages with mean 0.9 and spread 0.003 over 16k tokens: the variance taken as E[x^2] - mean^2 over
    float32 sums is 0.6% off (the whitened std 0.997); the moments are float64, so the result matches a float64
    reference to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x = 0.9 + 0.003 * torch.randn(64, 256, generator=g)
    w = masked_whiten(x, torch.ones_like(x))
    exact = x.double()
    exact = (exact - exact.mean()) / torch.sqrt(exact.var() + 1e-8)
    assert w.dtype == torch.float32
    assert torch.allclose(w.double(), exact, atol=1e-4), (w.double() - exact).abs().max()


def test_the_k_estimators_gradients_as_a_loss():
    """As a loss term on samples from the policy, k1's expected gradient is 0 (E[grad log p] = 0) and k3's pulls
    the policy towards the reference: the exact expectations over a 3-way categorical."""
    ref = torch.tensor([0.6, 0.3, 0.1]).log()
    grads = {}
    for kind in ("k1", "k3"):
        logits = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
        logp = torch.log_softmax(logits, -1)
        p = logp.exp().detach()  # the sampling distribution: the expectation over samples, written out exactly
        (p * kl_penalty(logp, ref, kind)).sum().backward()
        grads[kind] = logits.grad
    assert torch.allclose(grads["k1"], torch.zeros(3), atol=1e-6)
    stepped = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]) - 0.1 * grads["k3"], -1)
    policy = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    kl = lambda a: (a.exp() * (a - ref)).sum()  # noqa: E731
    assert kl(stepped) < kl(policy), "a k3 gradient step moves the policy towards the reference"



def test_preference_pairs_within_groups_largest_difference_first_ties_dropped():
    scores = T([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 3.0])
    groups = T([0, 0, 0, 0, 1, 1, 2])
    # group 0: 1>0 (rows 0,1; 0,3) by 1.0 first; then by 0.5: (2,1) and (2,3), whose rows were used once, before
    # (0,2), whose row 0 was used twice; group 1 ties; group 2 alone
    assert preference_pairs(scores, groups).tolist() == [[0, 1], [0, 3], [2, 1], [2, 3], [0, 2]]
    assert preference_pairs(scores, groups, per_group=2).tolist() == [[0, 1], [0, 3]]
    assert preference_pairs(T([1.0, 1.0]), T([0, 0])).shape == (0, 2)


def test_a_cap_on_pairs_spreads_over_the_groups_winners_and_losers():
    """Two wins and six losses, four pairs: both winners and four different losers, not one winner four times."""
    pairs = preference_pairs(T([1.0, 1.0, 0, 0, 0, 0, 0, 0]), T([0] * 8), per_group=4).tolist()
    assert pairs == [[0, 2], [1, 3], [0, 4], [1, 5]]


def test_dpo_and_ipo_losses_by_hand():
    chosen, rejected = T([-3.0, -5.0]), T([-4.0, -2.0])
    ref_chosen, ref_rejected = T([-3.5, -5.0]), T([-3.0, -2.5])
    # h = (c - rc) - (r - rr): pair 0: 0.5 - (-1.0) = 1.5; pair 1: 0.0 - 0.5 = -0.5
    losses, rc, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2)
    expected = [-math.log(1 / (1 + math.exp(-0.2 * 1.5))), -math.log(1 / (1 + math.exp(0.2 * 0.5)))]
    assert losses.tolist() == pytest.approx(expected)  # 0.5544, 0.7444
    assert rc.tolist() == pytest.approx([0.1, 0.0]) and rr.tolist() == pytest.approx([-0.2, 0.1])
    ipo, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2, kind="ipo")
    assert ipo.tolist() == pytest.approx([(1.5 - 2.5) ** 2, (-0.5 - 2.5) ** 2])  # 1 / (2 * 0.2) = 2.5
    # the gradient raises the chosen and lowers the rejected log-prob
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    dpo_loss(c, r, ref_chosen, ref_rejected, beta=0.2)[0].sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, kind="kto")
