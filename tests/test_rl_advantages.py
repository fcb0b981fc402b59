"""Advantage estimators by name: the built-in ones are `core`'s maths, a registered one is a valid setting that
the trainer calls, and an unknown name is refused in one line."""

from __future__ import annotations

import pytest
import torch

from spa_rl.errors import SpaError
from spa_rl.rl import core
from spa_rl.rl.advantages import ESTIMATORS, AdvantageInputs, register_advantage
from spa_rl.rl.config import RLConfig


def _inputs() -> AdvantageInputs:
    mask = torch.tensor([[0, 1, 1, 0.0], [0, 1, 0, 0.0], [0, 1, 1, 1.0]])
    rewards = torch.zeros_like(mask)
    rewards[0, 2], rewards[1, 1], rewards[2, 3] = 1.0, 0.0, 0.5
    return AdvantageInputs(rewards, torch.full_like(mask, 0.25), mask, torch.tensor([1.0, 0.0, 0.5]),
                           torch.tensor([0, 0, 1]))


def test_the_built_in_estimators_are_cores_maths():
    x, config = _inputs(), RLConfig.make(out="x")
    adv, ret = ESTIMATORS["grpo"].compute(x, config)
    want = core.group_advantages(x.scores, x.groups, config.grpo_norm_by_std)[:, None] * x.mask
    assert torch.equal(adv, want) and torch.equal(ret, torch.zeros_like(x.mask))
    assert adv[0, 1] > 0 > adv[1, 1], "the winner of group 0 is pushed up, the loser down"
    adv, ret = ESTIMATORS["gae"].compute(x, config)
    want_adv, want_ret = core.gae(x.rewards, x.values, x.mask, config.gamma, config.lam)
    assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret)
    assert not ESTIMATORS["grpo"].uses_critic and ESTIMATORS["gae"].uses_critic and \
        ESTIMATORS["bi-level-gae"].uses_critic


def test_an_unknown_estimator_is_refused_with_the_known_ones():
    with pytest.raises(SpaError, match="unknown advantage estimator 'gea': use one of gae, bi-level-gae, grpo"):
        RLConfig.make(out="x", advantage="gea")


def test_a_registered_estimator_is_a_setting_the_trainer_calls(tiny_model_dir, tmp_path):
    from test_rl_trainer import _config

    from spa_rl.rl.trainer import train_rl

    calls = []

    @register_advantage("test-halved-grpo", uses_critic=False)
    def halved(x, config):
        calls.append(x.mask.shape)
        adv, ret = ESTIMATORS["grpo"].compute(x, config)
        return adv / 2, ret

    try:
        config = _config(tmp_path / "run", tiny_model_dir, steps=1, eval_before=False, advantage="test-halved-grpo")
        assert not config.uses_critic
        train_rl(config, quiet=True)
    finally:
        ESTIMATORS.pop("test-halved-grpo")
    assert len(calls) == 1 and calls[0][0] > 0
    assert not (tmp_path / "run" / "critic").exists(), "an estimator without a critic trains none"
