"""The maths of multi-turn RL for LLM agents, as pure tensor functions (docs/method.md §6).

Every function takes and returns tensors (shapes in its docstring), touches no model, no optimizer and no
global state, so each is unit-tested against values computed by hand (`tests/test_rl_core.py`). Token tensors
are `[batch, tokens]`: one row per episode, the whole multi-turn conversation, with a `mask` that is 1 on the
tokens the agent is trained on (its own responses) and 0 on the system, user and environment text between
them and on padding.

What is here: multi-turn GAE that skips the masked tokens (veRL's multi-turn GAE), group-normalised
advantages (GRPO), turn-level ("bi-level") GAE (RAGEN's), the clipped policy loss with asymmetric and dual
clipping, the clipped value loss, loss aggregation (and its per-token weights for micro-batches), the KL
estimators, entropy, explained variance, the within-group reward-variance filter, and DPO's pairs and loss. No
maintained library offers these for multi-turn conversations without its whole trainer (veRL and RAGEN need Ray
and CUDA; TRL's DPO takes one prompt and one completion, not an episode whose environment turns carry no loss),
so they are written here, small and tested.

This module must never loop over anything but token positions or groups, and never change its inputs.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


# ------------------------------------------------------------------------------------------ masked reductions
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is set (over `dim`, or everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` weighted by `mask` (0/1, or any non-negative weights): sum(x * mask) / sum(mask), 0 where the
    mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    total = masked_sum(x, mask, dim)
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, sum of squares, count) of `x` over the masked entries, in float64 (the variance is taken as
    E[x^2] - mean^2, which loses the spread of values far from 0 in float32): what `masked_whiten` needs, and
    what several processes add up to whiten over all their entries."""
    x, mask = x.double(), mask.double()
    return (x * mask).sum(), (x * x * mask).sum(), mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, moments: tuple[torch.Tensor, ...] | None = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """`x` shifted to mean 0 and scaled to variance 1 over the masked entries (unbiased variance), 0 elsewhere;
    `moments`: `masked_moments` summed over more data than `x` (other processes'). Fewer than two entries: only
    shifted."""
    total, squares, n = (m.double() for m in (moments if moments is not None else masked_moments(x, mask)))
    mean = total / n.clamp(min=1)
    centered = (x.double() - mean) * mask
    if n < 2:
        return centered.to(x.dtype)
    var = (squares - n * mean * mean).clamp(min=0) / (n - 1)
    return (centered * torch.rsqrt(var + eps)).to(x.dtype)


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """One scalar from per-token losses [B, T]: `token-mean` (every masked token weighs the same),
    `seq-mean-token-sum` (each sequence's summed loss, averaged over sequences) or `seq-mean-token-mean` (each
    sequence's mean, averaged). Sequences with no masked token are left out."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}: use one of {', '.join(AGGREGATIONS)}")
    if mode == "token-mean":
        return masked_mean(losses, mask)
    has = mask.sum(-1) > 0
    per_seq = masked_sum(losses, mask, -1) if mode == "seq-mean-token-sum" else masked_mean(losses, mask, -1)
    return per_seq[has].mean() if has.any() else losses.sum() * 0


def token_weights(mask: torch.Tensor, rows: torch.Tensor, mode: str, total_tokens: float,
                  total_rows: float) -> torch.Tensor:
    """[B, T] each loss token's weight in the loss of the minibatch `rows` (indices into the batch, [M]), such that
    sum(weight x per-token loss) over any cut of the minibatch into micro-batches (and over processes) is exactly
    `aggregate(losses, mask, mode)` of the whole minibatch. `total_tokens`, `total_rows`: the minibatch's loss tokens
    and its rows with at least one, counted over every process. Rows outside the minibatch weigh 0.
    token-mean: 1 / total_tokens; seq-mean-token-sum: 1 / total_rows; seq-mean-token-mean: 1 / (total_rows x the
    row's own loss tokens)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}: use one of {', '.join(AGGREGATIONS)}")
    weights = torch.zeros_like(mask)
    if mode == "token-mean":
        weights[rows] = mask[rows] / max(total_tokens, 1.0)
    elif mode == "seq-mean-token-sum":
        weights[rows] = mask[rows] / max(total_rows, 1.0)
    else:
        weights[rows] = mask[rows] / (mask[rows].sum(-1, keepdim=True).clamp(min=1) * max(total_rows, 1.0))
    return weights


# ------------------------------------------------------------------------------------------ advantages
@torch.no_grad()
def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0, ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens of each row, skipping the others.

    `token_rewards`, `values`, `mask`: [B, T]. Tokens with `mask == 0` (the user's and environment's text
    between the agent's turns, padding) are not steps: the recursion carries across them as if they were not
    there, so the last token of one turn bootstraps from the value of the first token of the next turn. Rewards
    on unmasked tokens are ignored: put them on masked ones (the last token of a turn). After a row's last
    masked token the value is 0 (the episode ends); `ends` [B, T] (bool) marks more such ends, after which
    nothing is bootstrapped (bi-level GAE's turns).

        delta_t = r_t + gamma * V(next masked t') - V(t);   A_t = delta_t + gamma * lam * A_t'

    Returns (advantages, returns) [B, T], `returns = advantages + values`, both 0 where the mask is 0.
    """
    m = mask.bool()
    rewards, values = token_rewards.float(), values.float()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        here = m[:, t]
        if ends is not None:
            cut = ends[:, t] & here
            next_value = torch.where(cut, 0.0, next_value)
            last = torch.where(cut, 0.0, last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * last
        advantages[:, t] = torch.where(here, step, 0.0)
        last = torch.where(here, step, last)
        next_value = torch.where(here, values[:, t], next_value)
    return advantages, (advantages + values) * m


def turn_ends(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the last token of every run of consecutive masked tokens (a turn's last token)."""
    m = mask.bool()
    following = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    return m & ~following


@torch.no_grad()
def bi_level_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                 lam: float = 1.0, turn_gamma: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn-level GAE, then token-level GAE inside each turn (RAGEN's bi-level GAE).

    `token_rewards`, `values`, `mask`: [B, T]; a turn is a run of consecutive masked tokens. High level: the
    turns of a row form an MDP whose reward is the sum of the turn's token rewards and whose value is V at the
    turn's last token, discounted by `turn_gamma`:

        delta_i = R_i + turn_gamma * V(end_{i+1}) - V(end_i);   A_i = delta_i + turn_gamma * lam * A_{i+1}

    and the turn's return G_i = A_i + V(end_i). Low level: each turn on its own is an episode whose only reward
    is G_i on its last token; token-level GAE with `gamma`, `lam` inside it (nothing is bootstrapped across the
    turn's end). Returns (advantages, returns) [B, T], 0 where the mask is 0.
    """
    m = mask.bool()
    rewards, values = token_rewards.float() * m, values.float()
    ends = turn_ends(m)
    turn_id = torch.cumsum(ends.long(), dim=1) - ends.long()  # tokens of turn k (0-based) carry k
    low_rewards = torch.zeros_like(values)  # each turn's return G_i on its last token
    for b in range(values.shape[0]):  # high level: a handful of turns per row
        end_positions = ends[b].nonzero().flatten()
        n = len(end_positions)
        if n == 0:
            continue
        turn_rewards = torch.zeros(n, dtype=values.dtype, device=values.device)
        turn_rewards.index_add_(0, turn_id[b][m[b]], rewards[b][m[b]])
        end_values = values[b, end_positions]
        next_values = torch.cat([end_values[1:], end_values.new_zeros(1)])
        turn_adv = torch.zeros_like(end_values)
        last = end_values.new_zeros(())
        for i in range(n - 1, -1, -1):
            last = turn_rewards[i] + turn_gamma * next_values[i] - end_values[i] + turn_gamma * lam * last
            turn_adv[i] = last
        low_rewards[b, end_positions] = turn_adv + end_values
    # low level: every turn its own episode, in one pass over all rows
    return gae(low_rewards, values, m, gamma, lam, ends=ends)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_index: torch.Tensor, norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each episode's score minus its group's mean, divided by the group's standard deviation
    (unbiased) when `norm_by_std`. `scores`, `group_index`: [N] (groups are the samples of one puzzle). A group of
    one has no comparison: advantage 0. Returns [N]."""
    scores = scores.float()
    groups, inverse = torch.unique(group_index, return_inverse=True)
    count = torch.zeros(len(groups), device=scores.device).index_add_(0, inverse, torch.ones_like(scores))
    mean = torch.zeros(len(groups), device=scores.device).index_add_(0, inverse, scores) / count
    centered = scores - mean[inverse]
    sq = torch.zeros(len(groups), device=scores.device).index_add_(0, inverse, centered ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    out = centered / (std[inverse] + eps) if norm_by_std else centered
    return torch.where(count[inverse] > 1, out, torch.zeros_like(out))


def keep_most_varied_groups(group_std: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices of the groups to train on: the `keep_ratio` share (at least one) with the highest within-group
    reward standard deviation, ties broken by group order. `group_std`: [G]. Returns [K] sorted indices."""
    keep = max(1, math.floor(keep_ratio * len(group_std) + 1e-9))
    order = sorted(range(len(group_std)), key=lambda g: (-float(group_std[g]), g))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def preference_pairs(scores: torch.Tensor, group_index: torch.Tensor, per_group: int = 0) -> torch.Tensor:
    """DPO's pairs from groups of episodes (the samples of one puzzle): within each group, episodes paired with
    ones that scored strictly lower (ties make no pair), at most `per_group` pairs a group (0: all of them). Pairs
    are taken largest score difference first; among equal differences, the pair whose two episodes have been used
    least so far (then by row), so a cap spreads over the group's episodes instead of pairing one winner with
    every loser. `scores`, `group_index`: [N]. Returns [P, 2] row indices (chosen, rejected), groups in order."""
    pairs: list[tuple[int, int]] = []
    for g in torch.unique(group_index).tolist():
        rows = (group_index == g).nonzero().flatten().tolist()
        candidates = [(float(scores[a] - scores[b]), a, b) for a in rows for b in rows if scores[a] > scores[b]]
        uses = dict.fromkeys(rows, 0)
        for _ in range(min(len(candidates), per_group or len(candidates))):
            best = min(candidates, key=lambda c: (-c[0], uses[c[1]] + uses[c[2]], c[1], c[2]))
            candidates.remove(best)
            pairs.append((best[1], best[2]))
            uses[best[1]] += 1
            uses[best[2]] += 1
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


# ------------------------------------------------------------------------------------------ losses
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
                agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate with an asymmetric clip range and dual clipping. All inputs [B, T].

        ratio = exp(logp - old_logp)
        L = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (A < 0 only): L = min(L, -A * dual_clip)

    The dual clip bounds the loss of a token whose ratio has grown far above 1 under a negative advantage
    (`dual_clip` > 1; None turns it off). Returns (loss aggregated by `agg`, stats): `clipfrac` (share of masked
    tokens where the clip bound), `approx_kl` (the k3 estimate of KL(old || new), as CleanRL logs it), and
    `dual_clipfrac`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (losses > bound)
        losses = torch.where(dual, bound, losses)
        stats["dual_clipfrac"] = masked_mean(dual.float(), mask)
    with torch.no_grad():
        stats["approx_kl"] = masked_mean((ratio - 1) - log_ratio, mask)
    return aggregate(losses, mask, agg), stats


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1, kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation over pairs. Inputs [P]: the policy's and the reference's log-probabilities
    of each pair's chosen and rejected episode (summed over the agent's tokens; for `ipo`, averaged over them, as
    TRL does).

        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        sigmoid (DPO):  L = -log sigmoid(beta * h)
        ipo (IPO):      L = (h - 1 / (2 * beta))^2

    Returns (L [P], the implicit rewards beta * (chosen - ref_chosen) [P] and beta * (rejected - ref_rejected)
    [P], the latter two without gradient)."""
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}: use one of {', '.join(DPO_LOSSES)}")
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = -torch.nn.functional.logsigmoid(beta * h) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        return losses, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (TIS) for a sampler that is not exactly the trainer. All inputs [B, T].

        w = min(exp(old_logp - rollout_logp), cap)     (1 where mask is 0; no gradient)

    The episodes were drawn from the rollout engine's distribution (`rollout_logprobs`, its bf16 decode), while
    PPO's ratio is taken against the training forward's (`old_logprobs`); weighting each token's policy loss by w
    corrects the gradient for the gap, and the cap bounds the variance a rare token could bring. Returns (w, stats):
    `tis_mean` (mean weight over masked tokens) and `tis_clipfrac` (share of them at the cap).
    """
    with torch.no_grad():
        raw = torch.exp(old_logprobs - rollout_logprobs)
        weights = torch.where(mask > 0, raw.clamp(max=cap), torch.ones_like(raw))
        return weights, {"tis_mean": masked_mean(weights, mask), "tis_clipfrac": masked_mean((raw > cap).float(), mask)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.5, agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Half the squared error of the critic, with PPO's value clipping. All inputs [B, T].

        V_clip = old_V + clip(V - old_V, -clip, clip);   L = 0.5 * max((V - R)^2, (V_clip - R)^2)

    (`clip` None: no clipping.) Returns (loss aggregated by `agg`, stats): `clipfrac`, the share of masked
    tokens where the clipped error was the larger."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * aggregate(err, mask, agg), {"clipfrac": masked_mean(torch.zeros_like(err), mask)}
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    losses = torch.maximum(err, err_clipped)
    return 0.5 * aggregate(losses, mask, agg), {"clipfrac": masked_mean((err_clipped > err).float(), mask)}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs [B, T]: `k1` is
    logp - ref_logp (unbiased, can be negative); `k3` is exp(ref_logp - logp) - (ref_logp - logp) - 1
    (unbiased, never negative, lower variance; Schulman's estimator). Their values estimate the KL; used as a
    loss term (as here and in veRL's KL loss), their gradients do not: k1's expected gradient on the sampling
    policy is 0 (E[grad log p] = 0), and k3's is that of KL(reference || policy), which does pull the policy
    back towards the reference."""
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k3":
        return torch.exp(-diff) + diff - 1
    raise ValueError(f"unknown KL estimator {kind!r}: use k1 or k3")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of `logits` [..., V], over the last dimension: [...]."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 is a perfect critic, 0 one that
    predicts the mean, negative one that is worse (NaN when the returns do not vary)."""
    returns, values = returns.double(), values.double()
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    if var_returns <= 1e-12:  # the returns do not vary (to rounding): nothing to explain
        return torch.tensor(float("nan"))
    return (1 - var_residual / var_returns).float()
