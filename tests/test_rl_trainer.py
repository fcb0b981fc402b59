"""The PPO trainer end to end on a tiny model: what it logs and saves, exact resume, the masks it trains on,
and the settings it refuses before any rollout."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import killed_on_call, launch_errors, two_process_launch
from safetensors.torch import load_file

from spa_rl.cli import main
from spa_rl.errors import SpaError
from spa_rl.io import read_jsonl
from spa_rl.rl.config import RLConfig
from spa_rl.rl.episodes import build_trajectory, system_prefix_length
from spa_rl.rl.trainer import Batch, train_rl

SMALL = dict(env="frozenlake-det", puzzles_per_step=4, samples_per_puzzle=2, keep_ratio=1.0, minibatch_size=4,
             micro_batch_size=2, max_new_tokens=6, eval_puzzles=2, eval_samples=2, eval_every=0, dtype="fp32",
             tensorboard=False, actor_lr=1e-3, critic_lr=1e-3)


def _config(out, model, **kw):
    return RLConfig.make(out=str(out), model=str(model), **{**SMALL, **kw})


@pytest.mark.parametrize("advantage", ["gae", "grpo", "bi-level-gae"])
def test_two_steps_log_save_and_plot(tiny_model_dir, tmp_path, advantage):
    result = train_rl(_config(tmp_path / "run", tiny_model_dir, steps=2, advantage=advantage,
                              reward_placement="per-turn" if advantage == "bi-level-gae" else "final"), quiet=True)
    assert result["steps"] == 2 and "val/pass@1" in result and "val/pass@2" in result
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "losses/policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/grad_norm",
                "rollout/reward_mean", "rollout/success", "rollout/kept_group_std", "rollout/response_tokens",
                "rollout/logprob_mismatch", "rollout/distinct_actions", "rollout/distinct_responses",
                "time/generate", "time/score", "time/update"):
        assert key in steps[0], key
    assert ("losses/value_loss" in steps[0]) and (steps[0]["losses/value_loss"] > 0) == (advantage != "grpo")
    # a tiny random model fails every episode alike: no group's rewards vary, so only the critic learns
    assert steps[0]["rollout/kept_group_std"] == 0 and steps[0]["rollout/actor_updated"] == 0
    assert steps[0]["rollout/logprob_mismatch"] < 1e-3, "the trainer scores the sampled tokens as the sampler did"
    assert any("val/pass@1" in r for r in rows if r["step"] == 0), "the starting checkpoint is evaluated"
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "critic").is_dir() == (advantage != "grpo")
    if advantage != "grpo":  # the head starts at zero and has learned something by step 2
        assert steps[0]["critic/value_mean"] == steps[0]["critic/value_std"] == 0
        assert steps[1]["critic/value_mean"] != 0
        if advantage == "gae":  # γ = λ = 1, reward on the final token, every episode alike: each return is the reward
            assert steps[1]["critic/return_mean"] == pytest.approx(steps[1]["rollout/reward_mean"], abs=1e-6)
    else:
        assert "critic/value_mean" not in steps[0]
    assert main(["eval", "--env", "frozenlake-det", "--model", str(tmp_path / "run" / "model"), "--puzzles", "1",
                 "--samples", "1", "--max-new-tokens", "4", "--dtype", "fp32"]) == 0


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    import spa_rl.rl.trainer as trainer

    straight = train_rl(_config(tmp_path / "a", tiny_model_dir, steps=3, save_every=1), quiet=True)
    original = trainer.rl_step
    monkeypatch.setattr(trainer, "rl_step", killed_on_call(original, 3))
    with pytest.raises(KeyboardInterrupt):
        train_rl(_config(tmp_path / "b", tiny_model_dir, steps=3, save_every=1), quiet=True)
    monkeypatch.setattr(trainer, "rl_step", original)
    resumed = train_rl(_config(tmp_path / "b", tiny_model_dir, steps=3, save_every=1), quiet=True)
    assert resumed == straight
    for part in ("model/model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    logged = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "losses/policy_loss" in r]
    assert logged == [1, 2, 3]


def test_gradient_checkpointing_trains_actor_and_critic_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    import spa_rl.rl.trainer as trainer
    from spa_rl.models import checkpoint_layers

    wrapped = []
    monkeypatch.setattr(trainer, "checkpoint_layers", lambda m: wrapped.append(checkpoint_layers(m)) or wrapped[-1])
    for name, on in (("plain", False), ("checkpointed", True)):
        train_rl(_config(tmp_path / name, tiny_model_dir, steps=2, skip_uniform_steps=False,
                         gradient_checkpointing=on), quiet=True)
    assert wrapped == [2, 2], "the actor's and the critic's two layers are checkpointed, only when asked"
    for part in ("model/model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"):
        a, b = load_file(tmp_path / "plain" / part), load_file(tmp_path / "checkpointed" / part)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{part}: {k}")
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = load_file(tmp_path / "checkpointed" / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base), "the actor trained"


def test_masks_cover_exactly_the_agents_tokens_over_a_multi_turn_episode(tokenizer, tiny_model_dir):
    from test_rollout import ScriptedBackend

    from spa_rl.rollout import RolloutConfig, RolloutEngine

    text = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> Up </answer>"
    engine = RolloutEngine(RolloutConfig(env="sokoban", max_turns=3), ScriptedBackend(tokenizer, [text]), tokenizer)
    (episode,) = engine.run([5])
    assert len(episode.turns) == 3
    traj = build_trajectory(episode, tokenizer, 0, placement="per-turn")
    covered = tokenizer.decode([t for t, m in zip(traj.ids, traj.mask, strict=True) if m])
    responses = "".join(tokenizer.decode(t.response_ids) for t in episode.turns)
    assert covered == responses and sum(traj.mask) == sum(len(t.response_ids) for t in episode.turns)
    ends = [i for i, r in enumerate(traj.rewards) if r != 0]
    assert [traj.mask[i] for i in ends] == [1, 1, 1] and all(traj.mask[i + 1] == 0 for i in ends[:-1]), \
        "each turn's reward sits on its last sampled token"
    assert traj.rewards[ends[-1]] == pytest.approx(episode.turns[-1].reward)
    final = build_trajectory(episode, tokenizer, 0, placement="final")
    assert [i for i, r in enumerate(final.rewards) if r != 0] == [ends[-1]]
    assert final.rewards[ends[-1]] == pytest.approx(episode.total_reward)
    bonus = {"novelty": (0.5, [1.0, -2.0, 4.0])}  # a bonus is added to its own turn's reward, wherever that sits
    per_turn = build_trajectory(episode, tokenizer, 0, placement="per-turn", bonuses=bonus)
    assert [per_turn.rewards[i] for i in ends] == pytest.approx([t.reward + 0.5 * v for t, v in
                                                                 zip(episode.turns, [1.0, -2.0, 4.0], strict=True)])
    summed = build_trajectory(episode, tokenizer, 0, placement="final", bonuses=bonus)
    assert [i for i, r in enumerate(summed.rewards) if r != 0] == [ends[-1]]
    assert summed.rewards[ends[-1]] == pytest.approx(episode.total_reward + 1.5) == pytest.approx(summed.score)
    after = build_trajectory(episode, tokenizer, 0, loss_tokens="after-system")
    skip = system_prefix_length(tokenizer, episode.messages, after.ids)
    assert skip > 0 and after.mask == [0] * skip + [1] * (len(after.ids) - skip)
    assert "You're a helpful assistant." in tokenizer.decode(after.ids[:skip])


@pytest.mark.parametrize("settings,message", [
    (dict(keep_ratio=0.25, minibatch_size=64), "fewer than one minibatch"),
    (dict(samples_per_puzzle=1, advantage="grpo", minibatch_size=1), "grpo needs samples_per_puzzle >= 2"),
    (dict(samples_per_puzzle=1, keep_ratio=0.5, minibatch_size=1), "keep_ratio < 1 needs samples_per_puzzle >= 2"),
    (dict(kl_coef=0.1, reference="none"), "kl_coef > 0 needs a reference model"),
    (dict(format="plain", prediction_reward=1.0), "need --format world-model"),
    (dict(dtype="fp16"), "fp16 cannot be trained"),
    (dict(advantage="grpo", critic_warmup=1), "critic_warmup needs a critic"),
    (dict(steps=3, critic_warmup=3), "leaves the actor no step"),
    (dict(shard_weights=True, shard_optimizer=True), "drop --shard-optimizer"),
    (dict(shard_weights=True, lora=True), "shard_weights is for full fine-tunes"),
    (dict(algorithm="dpo", samples_per_puzzle=1), "dpo needs samples_per_puzzle >= 2"),
    (dict(algorithm="dpo", reference="none"), "dpo needs a reference model"),
    (dict(algorithm="dpo", kl_coef=0.1), "kl_coef is a PPO setting: algorithm dpo does not use it"),
    (dict(dpo_data="data"), "dpo_data is offline DPO's data: set --algorithm dpo"),
])
def test_settings_that_cannot_work_together_are_refused(tmp_path, settings, message):
    with pytest.raises(SpaError, match=message):
        _config(tmp_path / "x", "smollm2-135m", **settings)
    assert not (tmp_path / "x").exists(), "refused before anything was written"


def test_an_init_that_is_not_a_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "README").write_text("hello")
    assert main(["train", "--env", "frozenlake-det", "--init", str(tmp_path / "notamodel"), "--out",
                 str(tmp_path / "run"), "--keep-ratio", "1", "--minibatch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load the model" in err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stage"] == "train"


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_a_minibatch_cut_into_micro_batches_gives_the_same_loss_and_gradient(tokenizer, agg):
    """The loss and gradient of a minibatch do not depend on how it is cut for memory: they equal
    `core.aggregate` over the whole minibatch."""
    import copy

    from conftest import build_tiny_model

    from spa_rl.rl import core
    from spa_rl.rl.episodes import Trajectory
    from spa_rl.rl.models import PolicyModel
    from spa_rl.rl.trainer import Batch, Learners, score_rows, update
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    gen = torch.Generator().manual_seed(0)
    trajectories = []
    for n in (9, 14, 6, 11):
        ids = torch.randint(10, 500, (n,), generator=gen).tolist()
        mask = [0, 0] + torch.randint(0, 2, (n - 2,), generator=gen).tolist()
        mask[-1] = 1
        trajectories.append(Trajectory(ids, mask, mask, [0.0] * n, [0.0] * n, 0, 0.0))
    base = PolicyModel(build_tiny_model(tokenizer).eval())
    batch = Batch.of(trajectories, pad_id=0)
    results = []
    for micro in (4, 2, 1):
        config = RLConfig.make(out="x", keep_ratio=1.0, puzzles_per_step=2, samples_per_puzzle=2, minibatch_size=4,
                               micro_batch_size=micro, loss_agg=agg, advantage="grpo", dtype="fp32")
        policy = copy.deepcopy(base)
        actor = Trainable(policy, resolve_precision("fp32", "cpu", training=True), make_accelerator("cpu"),
                          lr=1e-9, total_steps=1, schedule="constant", max_grad_norm=1e9)
        batch.old_logprobs = score_rows(actor, batch, config, "cpu") - 0.3 * batch.mask
        batch.advantages = torch.linspace(-1, 1, batch.mask.numel()).view_as(batch.mask) * batch.mask
        learners = Learners(actor, None, None, None, tokenizer, actor.accelerator, sharded=False)
        results.append(update(batch, trajectories, config, learners, 0))
        if micro == 4:  # one micro-batch: the loss must be core.aggregate over the whole minibatch
            ids, attention, keep, width = batch.rows([0, 1, 2, 3], "cpu")
            with torch.no_grad():
                logp_flat, _ = copy.deepcopy(base)(ids, attention, keep)
            logp = torch.zeros(keep.shape).masked_scatter(keep, logp_flat)
            want, _ = core.policy_loss(logp, batch.old_logprobs[:, :width - 1], batch.advantages[:, :width - 1],
                                       batch.mask[:, :width - 1], agg=agg)
            assert results[-1]["losses/policy_loss"] == pytest.approx(float(want), rel=1e-5)
    for other in results[1:]:
        for key in ("losses/policy_loss", "losses/grad_norm", "losses/clipfrac", "losses/approx_kl", "losses/entropy"):
            assert other[key] == pytest.approx(results[0][key], rel=1e-4, abs=1e-7), key


@pytest.mark.slow
def test_two_processes_with_accelerate_launch_stay_identical(tiny_model_dir, tmp_path):
    """`accelerate launch --num_processes 2` on the CPU runs two steps; both processes end with the same weights.
    (accelerate's `--cpu` launcher starts several processes only through MPI; `--multi_gpu` starts them with
    torchrun, and `--device cpu` keeps them on the CPU with the gloo backend.)"""
    import os
    import subprocess

    cmd = two_process_launch("-m", "spa_rl.cli", "train", "--env", "frozenlake-det",
           "--init", str(tiny_model_dir), "--out", str(tmp_path / "run"), "--steps", "2", "--puzzles-per-step", "4",
           "--samples-per-puzzle", "2", "--keep-ratio", "1", "--minibatch-size", "4", "--micro-batch-size", "1",
           "--max-new-tokens", "6", "--eval-puzzles", "2", "--eval-samples", "2", "--eval-every", "0",
           "--no-eval-before", "--dtype", "fp32", "--device", "cpu", "--no-tensorboard", "--actor-lr", "1e-3",
           "--critic-lr", "1e-3", "--no-skip-uniform-steps")  # a tiny random model scores alike: update anyway
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, launch_errors(done.stderr)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "losses/policy_loss" in r] == [1, 2]
    (final,) = [r for r in rows if "dist/weight_spread" in r]
    assert final["dist/weight_spread"] == 0.0
    head = load_file(tmp_path / "run" / "critic" / "value_head.safetensors")
    assert head["weight"].abs().sum() > 0, "the critic made (the same) updates: its head left zero"
    trained, start = load_file(tmp_path / "run" / "model" / "model.safetensors"), load_file(
        tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the actor made (the same) updates"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "tolerance"), [("optimizer", 1e-4), ("weights", 1e-4), ("weights-bf16", 1e-3)])
def test_sharded_over_two_processes_makes_the_same_updates_and_resumes(tiny_model_dir, tmp_path, mode, tolerance):
    """Under two processes, `--shard-optimizer` (ZeRO stage 1: each holds half the AdamW state) and
    `--shard-weights` (FSDP: each holds half of every weight, gradient and AdamW state; every pass a collective,
    with the processes cutting their rows into different numbers of micro-batches), the latter also in bf16 with
    gradient checkpointing, the world-model loss and curiosity, make the updates of an unsharded run, and a run
    interrupted after a checkpoint resumes to the same weights as one run straight through (the checkpoint
    gathers the shards; each process reloads its own). bf16: FSDP's mixed precision against master weights,
    the same arithmetic up to where bf16 rounds (measured: gradient norms within 3e-4)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).with_name("distributed_resume.py")
    cmd = two_process_launch(str(script), str(tiny_model_dir), str(tmp_path), mode)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, launch_errors(done.stderr)
    for run, share in (("whole", 1.0), ("straight", None), ("resumed", None)):
        (final,) = [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "dist/weight_spread" in r]
        assert final["dist/weight_spread"] == 0.0, run
        if share is not None:
            assert final["dist/optimizer_state_share"] == share
        elif mode.startswith("weights"):  # every tensor is cut in two along its first dimension
            assert final["dist/optimizer_state_share"] == pytest.approx(0.5, abs=0.01), run
        else:  # whole tensors are shared out: the tiny model's embedding is most of it, so far from equal
            assert 0 < final["dist/optimizer_state_share"] < 1, run
    norms = {run: [(r["losses/grad_norm"], r["losses/critic_grad_norm"])
                   for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "losses/grad_norm" in r]
             for run in ("whole", "straight")}  # AdamW and clipping hide a gradient's scale from the weights
    # step 1: the same weights and the same (scripted) episodes, so the same gradients up to summation order
    assert norms["straight"][0] == pytest.approx(norms["whole"][0], rel=tolerance)
    # later steps start from weights that differ where the two runs rounded differently, which AdamW's first steps
    # enlarge where a gradient is near 0: how far depends on the CPU's kernels (measured up to 0.76% on an AMX CPU),
    # so they are held to what a wrong sum would break (a process's gradient dropped or counted twice: 30% or more)
    later = {run: [x for pair in norms[run][1:] for x in pair] for run in norms}
    assert later["straight"] == pytest.approx(later["whole"], rel=0.05)
    if mode != "weights-bf16":  # generation ran on the current weights (sharded: on the copy, refreshed each step)
        for run in ("straight", "resumed"):
            mismatch = [r["rollout/logprob_mismatch"] for r in read_jsonl(tmp_path / run / "metrics.jsonl")
                        if "losses/grad_norm" in r]
            assert max(mismatch) < 1e-5, (run, mismatch)  # measured: 2.5e-7 (a stale copy: 0.009 at step 2)
    if mode == "weights-bf16":  # the passes these extras add ran, in step, on the sharded actor and its copy
        rows = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "losses/grad_norm" in r]
        assert all(r["losses/world_model"] > 0 and r["rollout/novelty"] > 0 for r in rows)
    start = load_file(tiny_model_dir / "model.safetensors")
    for part in ("model/model.safetensors", "critic/model.safetensors", "critic/value_head.safetensors"):
        whole, straight, resumed = (load_file(tmp_path / run / part) for run in ("whole", "straight", "resumed"))
        assert straight.keys() == whole.keys(), part
        for k in straight:
            # FSDP sums over processes per micro-batch, DDP once per step: the rounding differs, and AdamW's first
            # steps enlarge it where a gradient is near 0 (rarely seen embedding rows), so measure it against how
            # far the weights moved (measured: at most 0.3% of it in fp32, 3.4% in bf16)
            before = start.get(k, start.get(f"model.{k}", torch.zeros_like(whole[k])))
            moved = float((whole[k] - before).abs().max())
            torch.testing.assert_close(straight[k], whole[k], rtol=0, atol=200 * tolerance * moved + 1e-7,
                                       msg=f"{part} {k}")
            assert torch.equal(straight[k], resumed[k]), f"{part} {k}"
    actor = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    assert any(not torch.equal(actor[k], start[k]) for k in start), "the actor made updates"
    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "losses/policy_loss" in r]
    assert steps == [1, 2, 3]


def test_the_extras_and_options_run_and_are_logged(tiny_model_dir, tmp_path, tokenizer, monkeypatch):
    """World-model loss, prediction reward, curiosity, a KL penalty to the reference, LoRA, per-turn rewards,
    after-system loss tokens: a step each way, their terms in the log. The first run plays well-formed scripted
    responses (a random model breaks the format, and malformed turns have no world-model term)."""
    from test_rollout import ScriptedBackend

    import spa_rl.rl.trainer as trainer

    class Scripted(ScriptedBackend):
        def reset(self):
            pass

    good = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> {} </answer>"
    texts = [good.format(a) for a in ("Right", "Down", "Left", "Down", "Up")]
    monkeypatch.setattr(trainer, "make_backend", lambda *a, **k: Scripted(tokenizer, texts))
    train_rl(_config(tmp_path / "a", tiny_model_dir, steps=1, world_model_coef=0.5, prediction_reward=1.0,
                     prediction_match="cell", curiosity_coef=0.1, kl_coef=0.05, kl_estimator="k3",
                     reward_placement="per-turn", eval_before=False, skip_uniform_steps=False), quiet=True)
    (row,) = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "losses/policy_loss" in r]
    assert row["losses/world_model"] > 0 and "losses/kl" in row
    assert "rollout/prediction_bonus" in row and "rollout/game_reward_mean" in row
    assert "rollout/novelty_bonus" not in row, "centred, the curiosity bonus averages 0 by design: not logged"
    assert row["rollout/moved_turns"] > 0 and row["rollout/novelty"] > 0
    monkeypatch.undo()
    result = train_rl(_config(tmp_path / "b", tiny_model_dir, steps=1, lora=True, loss_tokens="after-system",
                              advantage="grpo", eval_before=False, skip_uniform_steps=False), quiet=True)
    assert result["steps"] == 1 and (tmp_path / "b" / "model" / "adapter_config.json").is_file()


def test_the_critics_clip_fraction_is_a_fraction_when_the_actor_sits_out(tiny_model_dir, tmp_path):
    """A tiny random model fails every episode alike, so the actor sits the step out and only the critic trains;
    its clip fraction is still weighted by the minibatch's tokens (under seq-mean-token-sum the row weights sum to
    the rows, not to 1), and a tight value clip over two epochs makes it clip."""
    train_rl(_config(tmp_path / "run", tiny_model_dir, steps=1, ppo_epochs=2, value_clip=1e-6,
                     loss_agg="seq-mean-token-sum", eval_before=False), quiet=True)
    (row,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "losses/value_loss" in r]
    assert row["rollout/actor_updated"] == 0
    assert 0 < row["losses/value_clipfrac"] <= 1


def test_the_actor_sits_out_the_critics_warm_up(tiny_model_dir, tmp_path):
    """--critic-warmup 1: in step 1 only the critic learns, though without the warm-up the actor would update in
    every step here (--no-skip-uniform-steps); in step 2 both do."""
    train_rl(_config(tmp_path / "run", tiny_model_dir, steps=2, critic_warmup=1, skip_uniform_steps=False,
                     eval_before=False), quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "losses/value_loss" in r]
    assert [r["rollout/actor_updated"] for r in rows] == [0, 1]
    assert rows[0]["losses/grad_norm"] == 0 and rows[1]["losses/grad_norm"] > 0
    assert all(r["losses/value_loss"] > 0 and r["losses/critic_grad_norm"] > 0 for r in rows)


def test_the_world_model_term_holds_the_true_states_of_well_formed_turns_only(tokenizer):
    """The world-model sequence is the episode rewritten with the true states; a malformed turn (here cut off inside
    its prediction, a stray tag in its reasoning) ends it, as in `spa collect`, so the mask never covers the model's
    own text; an episode malformed from its first turn has no sequence."""
    from test_rollout import ScriptedBackend

    from spa_rl.rl.episodes import world_model_targets
    from spa_rl.rollout import RolloutConfig, RolloutEngine

    good = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> Right </answer>"
    broken = "<think> <observation> x </observation> I go down <prediction>\n_P"
    config = RolloutConfig(env="frozenlake-det", max_turns=3, render="grid+coords")
    engine = RolloutEngine(config, ScriptedBackend(tokenizer, [good, broken], truncate=[1]), tokenizer)
    (episode,) = engine.run([3])
    assert len(episode.turns) >= 2 and episode.turns[0].parsed.format_ok and not episode.turns[1].parsed.format_ok
    ids, mask = world_model_targets(tokenizer, episode, "world-model", "grid+coords")
    first = episode.turns[0]
    covered = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "".join(covered.split()) == "".join((first.state_before + first.state_after).split())
    assert "I go down" not in tokenizer.decode(ids) and "go" in tokenizer.decode(ids)
    engine = RolloutEngine(config, ScriptedBackend(tokenizer, [broken], truncate=[0]), tokenizer)
    (episode,) = engine.run([3])
    assert world_model_targets(tokenizer, episode, "world-model", "grid+coords") is None


def test_the_curiosity_bonus_pays_moves_to_unfamiliar_states_and_not_length(tokenizer, tiny_model_dir):
    """beta * N(s') on the turns that moved, 0 on a turn that left the state as it was; centred, the bonuses of the
    moved turns sum to 0 (no pay for playing longer); uncentred, they are the novelty scorer's N(s')."""
    from test_rollout import ScriptedBackend

    from spa_rl.models import load_model
    from spa_rl.novelty import state_novelty
    from spa_rl.rl.episodes import per_turn_bonuses
    from spa_rl.rollout import RolloutEngine

    good = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> {} </answer>"
    texts = [good.format("Right"), "no format", good.format("Down"), good.format("Left")]
    config = _config("unused", tiny_model_dir, curiosity_coef=0.5, max_turns=4)
    engine = RolloutEngine(config.rollout, ScriptedBackend(tokenizer, texts), tokenizer)
    episodes = engine.run([0, 1, 2], group_size=2)
    moved = [t.state_after != t.state_before for e in episodes for t in e.turns]
    assert any(moved) and not all(moved), "the scripted play has turns that move and turns that do not"
    lm = load_model(str(tiny_model_dir), "cpu", "fp32").model
    def novelty_of(states):
        return state_novelty(lm, tokenizer, config.rollout, states)

    bonuses, stats = per_turn_bonuses(episodes, config, novelty_of)
    centred = [v for b in bonuses for v in b["novelty"][1]]
    assert all(b["novelty"][0] == 0.5 for b in bonuses)
    assert all(v == 0 for v, m in zip(centred, moved, strict=True) if not m)
    assert sum(centred) == pytest.approx(0, abs=1e-6) and any(abs(v) > 1e-4 for v in centred)
    assert stats["rollout/moved_turns"] == pytest.approx(sum(moved) / len(moved))
    raw, _ = per_turn_bonuses(episodes, dataclasses.replace(config, curiosity_center=False), novelty_of)
    reached = [t.state_after for e in episodes for t in e.turns]
    expected = dict(zip(reached, state_novelty(lm, tokenizer, config.rollout, reached), strict=True))
    got = [v for b in raw for v in b["novelty"][1]]
    for v, m, s in zip(got, moved, reached, strict=True):
        assert v == (pytest.approx(expected[s], rel=1e-4) if m else 0)
    assert stats["rollout/novelty"] == pytest.approx(sum(v for v, m in zip(got, moved, strict=True) if m) / sum(moved))



def test_the_critic_fits_returns_that_its_input_determines(tokenizer):
    """The critic's whole path (the decoder's hidden states, the zero-initialised head, the clipped value loss, the
    optimizer) can fit returns: episodes whose return is 1 when their third token is one word and 0 when it is
    another, values read from that token on. Explained variance starts at 0 (every value is 0) and must pass 0.9,
    so a critic whose explained variance stays at 0 in a real run is learning slowly, not wired wrong."""
    from conftest import build_tiny_model

    from spa_rl.rl.core import explained_variance, value_loss
    from spa_rl.rl.models import ValueModel
    from spa_rl.training.optim import Trainable, make_accelerator
    from spa_rl.training.precision import Precision

    critic = ValueModel.from_causal_lm(build_tiny_model(tokenizer)).train()
    trainable = Trainable(critic, Precision("fp32"), make_accelerator("cpu"), lr=3e-3, total_steps=100,
                          schedule="constant")
    generator = torch.Generator().manual_seed(0)
    win, lose = tokenizer.convert_tokens_to_ids(["win", "lose"])
    ids = torch.randint(100, 1000, (16, 8), generator=generator)
    ids[:, 2] = torch.where(torch.arange(16) % 2 == 0, win, lose)
    attention = torch.ones_like(ids)
    keep = torch.zeros(16, 7, dtype=torch.bool)
    keep[:, 2:] = True  # the states from the third token on
    returns = (ids[:, 2] == win).float()[:, None].expand(16, 5)
    mask = torch.ones(16, 5)
    variance = []
    for _ in range(60):
        with torch.no_grad():
            old = critic(ids, attention, keep).view(16, 5)
        variance.append(float(explained_variance(old, returns, mask)))
        loss, _ = value_loss(critic(ids, attention, keep).view(16, 5), old, returns, mask, clip=0.5)
        trainable.backward(loss)
        trainable.step()
    assert variance[0] == 0.0 and max(variance) > 0.9, f"explained variance {variance[0]:.2f} -> {max(variance):.2f}"


def test_curves_of_a_one_step_run_show_every_value():
    from spa_rl.plots import rl_figure

    rows = [{"step": 0, "val/pass@1": 0.2}, {"step": 1, "rollout/reward_mean": 0.1, "losses/policy_loss": -0.02,
                                             "losses/entropy": 0.3}, {"step": 1, "val/pass@1": 0.1}]
    fig = rl_figure(rows, "one-step")
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 4 and all(line.get_marker() == "o" for line in lines), "a lone point is drawn, not a void"
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > 1, "every panel spans the run's steps with room at both ends"
    many = [{"step": s, "rollout/reward_mean": 0.1} for s in range(1, 51)]
    assert rl_figure(many, "long").axes[0].get_lines()[0].get_marker() in ("None", "", None), "long runs: plain lines"


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_one_pass_updates_make_the_updates_of_a_separate_scoring_pass(tiny_model_dir, tmp_path, monkeypatch,
                                                                       advantage):
    """One epoch over one minibatch (`RLConfig.one_pass`): the old log-probs and values come from the update's own
    forward passes instead of a scoring pass before it; two steps end at the weights and the logged numbers of a
    run that scores first (fp32: up to summation order)."""
    settings = dict(steps=2, minibatch_size=8, micro_batch_size=3, skip_uniform_steps=False, advantage=advantage,
                    eval_before=False)
    assert _config(tmp_path / "x", tiny_model_dir, **settings).one_pass
    train_rl(_config(tmp_path / "one", tiny_model_dir, **settings), quiet=True)
    monkeypatch.setattr(RLConfig, "one_pass", property(lambda self: False))
    train_rl(_config(tmp_path / "two", tiny_model_dir, **settings), quiet=True)
    rows = {run: [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "losses/policy_loss" in r]
            for run in ("one", "two")}
    for one, two in zip(rows["one"], rows["two"], strict=True):
        assert one["rollout/actor_updated"] == 1.0
        for key in ("losses/policy_loss", "losses/grad_norm", "losses/entropy", "rollout/logprob_mismatch",
                    *(("losses/value_loss", "losses/critic_grad_norm", "critic/value_mean", "critic/return_std")
                      if advantage == "gae" else ())):
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-7), key
        assert one["time/score"] < two["time/score"]
    start = load_file(tiny_model_dir / "model.safetensors")
    for part in ("model/model.safetensors", *(("critic/value_head.safetensors",) if advantage == "gae" else ())):
        one, two = load_file(tmp_path / "one" / part), load_file(tmp_path / "two" / part)
        for k in one:  # AdamW's first steps enlarge a rounding difference where a gradient is near 0: measured
            # against how far the weights moved (measured: at most 1.4% of it)
            moved = float((two[k] - start.get(k, torch.zeros_like(two[k]))).abs().max())
            torch.testing.assert_close(one[k], two[k], rtol=0, atol=5e-2 * moved + 1e-7, msg=f"{part} {k}")


def test_training_with_the_hf_generate_backend(tiny_model_dir, tmp_path):
    """`--backend hf` (Hugging Face generate, the reference sampler) trains too (it once failed on `reset`)."""
    result = train_rl(_config(tmp_path / "run", tiny_model_dir, steps=1, backend="hf", eval_before=False), quiet=True)
    assert result["steps"] == 1
    (row,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "losses/policy_loss" in r]
    assert row["rollout/response_tokens"] > 0


def test_a_micro_batch_that_cannot_fit_in_memory_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(SpaError, match=r"spa train: micro-batches of 1,000,000,000,000 tokens need about .* GiB.*"
                                       r"more than the .* GiB available"):
        train_rl(_config(tmp_path / "run", tiny_model_dir, micro_batch_tokens=10**12), quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_truncated_importance_sampling_weights_the_update_by_the_samplers_gap(tiny_model_dir, tmp_path, monkeypatch):
    """`--tis-cap`: with a sampler whose probabilities are half the trainer's on every sampled token (the rollout
    log-probs shifted by log 2), each token's weight is min(2, cap): the first step's policy gradient is the cap
    times that of the same step without the correction (ratio 1 in a one-pass step); with the true
    log-probs (fp32, the same model) the weights are 1. GRPO over scores set to vary within each group (a random
    tiny model wins nothing), no entropy bonus: the whole gradient is the policy's."""
    original = Batch.of

    def scored(shift):
        def of(trajectories, pad_id):
            batch = original(trajectories, pad_id)
            batch.scores = torch.arange(len(trajectories), dtype=batch.scores.dtype) % 2
            batch.rollout_logprobs = batch.rollout_logprobs - shift * batch.sampled
            return batch
        return staticmethod(of)

    settings = dict(steps=1, minibatch_size=8, skip_uniform_steps=False, eval_before=False, advantage="grpo",
                    entropy_coef=0.0)
    rows = {}
    for run, shift, cap in (("plain", 0.0, 0.0), ("true", 0.0, 2.0), ("halved", math.log(2), 1.5)):
        monkeypatch.setattr(Batch, "of", scored(shift))
        train_rl(_config(tmp_path / run, tiny_model_dir, tis_cap=cap, **settings), quiet=True)
        rows[run] = next(r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "losses/policy_loss" in r)
    plain, true, capped = rows["plain"], rows["true"], rows["halved"]
    assert "rollout/tis_mean" not in plain and plain["losses/grad_norm"] > 1e-3
    assert true["rollout/tis_mean"] == pytest.approx(1.0, abs=1e-3)
    assert true["losses/grad_norm"] == pytest.approx(plain["losses/grad_norm"], rel=1e-3)
    assert capped["rollout/tis_mean"] == pytest.approx(1.5) and capped["rollout/tis_clipfrac"] == pytest.approx(1.0)
    assert capped["losses/grad_norm"] == pytest.approx(1.5 * plain["losses/grad_norm"], rel=1e-3)


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_an_update_raises_the_winners_log_prob_and_lowers_the_losers(tokenizer, ppo_epochs):
    """The point of the policy gradient: after one GRPO update on a group of two episodes of the same puzzle,
    the one that scored higher is more likely under the actor and the one that scored lower less likely (the
    one-pass path, `ppo_epochs` 1, and the separate scoring pass, 2). A flipped sign, advantages attached to
    the wrong rows or a mask shifted by one token fails it."""
    from conftest import build_tiny_model

    from spa_rl.rl import core
    from spa_rl.rl.episodes import Trajectory
    from spa_rl.rl.models import PolicyModel
    from spa_rl.rl.trainer import Learners, score_rows, update
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    torch.manual_seed(0)
    prompt = torch.randint(10, 500, (12,)).tolist()
    trajectories = []
    for score in (1.0, 0.0):
        response = torch.randint(10, 500, (8,)).tolist()
        mask = [0] * len(prompt) + [1] * len(response)
        trajectories.append(Trajectory(prompt + response, mask, mask, [0.0] * len(mask), [0.0] * len(mask), 0,
                                       score))
    config = RLConfig.make(out="x", keep_ratio=1.0, puzzles_per_step=1, samples_per_puzzle=2, minibatch_size=2,
                           micro_batch_size=1, advantage="grpo", dtype="fp32", ppo_epochs=ppo_epochs,
                           entropy_coef=0.0)
    assert config.one_pass == (ppo_epochs == 1)
    actor = Trainable(PolicyModel(build_tiny_model(tokenizer).eval()),
                      resolve_precision("fp32", "cpu", training=True), make_accelerator("cpu"), lr=1e-3,
                      total_steps=ppo_epochs, schedule="constant", max_grad_norm=1e9)
    batch = Batch.of(trajectories, pad_id=0)
    before = score_rows(actor, batch, config, "cpu")
    batch.old_logprobs = torch.zeros_like(batch.mask) if config.one_pass else before.clone()
    adv = core.group_advantages(batch.scores, batch.groups, config.grpo_norm_by_std)
    assert adv[0] > 0 > adv[1]
    batch.advantages, batch.returns = adv[:, None] * batch.mask, torch.zeros_like(batch.mask)
    update(batch, trajectories, config, Learners(actor, None, None, None, tokenizer, actor.accelerator, False), 0)
    after = score_rows(actor, batch, config, "cpu")
    change = ((after - before) * batch.mask).sum(-1)
    assert change[0] > 0.05, change
    assert change[1] < -0.05, change


def _one_term_update(tokenizer, term: str):
    """What one update with only `term` switched on (kl, entropy or world-model) needs: a uniform group of two
    episodes (every GRPO advantage 0, so the policy gradient is 0), a tiny actor at lr 1e-3 (and, for kl, another
    random model, of another seed, as the reference). Returns (actor, batch, trajectories, config, learners,
    score_rows, update)."""
    from conftest import build_tiny_model

    from spa_rl.rl.episodes import Trajectory
    from spa_rl.rl.models import PolicyModel
    from spa_rl.rl.trainer import Learners, score_rows, update
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    torch.manual_seed(1)
    trajectories = []
    for score in (1.0, 1.0):  # a uniform group: GRPO's advantages are 0
        ids = torch.randint(10, 500, (20,)).tolist()
        mask = [0] * 10 + [1] * 10
        wm_mask = [0] * 12 + [1] * 8
        trajectories.append(Trajectory(ids, mask, mask, [0.0] * 20, [0.0] * 20, 0, score,
                                       world_model=(ids, wm_mask) if term == "world-model" else None))
    settings = {"kl": dict(kl_coef=1.0, reference="init", kl_estimator="k3", entropy_coef=0.0),
                "entropy": dict(entropy_coef=1.0),
                "world-model": dict(world_model_coef=1.0, entropy_coef=0.0, format="world-model")}[term]
    config = RLConfig.make(out="x", keep_ratio=1.0, puzzles_per_step=1, samples_per_puzzle=2, minibatch_size=2,
                           advantage="grpo", dtype="fp32", skip_uniform_steps=False, **settings)
    # a random tiny model is near-uniform over the vocabulary; at temperature 0.1 its entropy has room to rise
    temperature = 0.1 if term == "entropy" else 1.0
    actor = Trainable(PolicyModel(build_tiny_model(tokenizer).eval(), temperature),
                      resolve_precision("fp32", "cpu", training=True), make_accelerator("cpu"), lr=1e-3,
                      total_steps=1, schedule="constant", max_grad_norm=1e9)
    reference = (PolicyModel(build_tiny_model(tokenizer, seed=1).eval().requires_grad_(False)) if term == "kl"
                 else None)
    batch = Batch.of(trajectories, pad_id=0)
    learners = Learners(actor, None, reference, None, tokenizer, actor.accelerator, False)
    if reference is not None:
        batch.ref_logprobs = score_rows(reference, batch, config, "cpu", autocast=actor.autocast)
    return actor, batch, trajectories, config, learners, score_rows, update


def _mean_kl(actor_logp, ref_logp, mask):
    from spa_rl.rl import core
    return float(core.masked_mean(core.kl_penalty(actor_logp, ref_logp, "k3"), mask))


def test_the_kl_term_pulls_the_policy_towards_the_reference(tokenizer):
    """With no policy gradient (every advantage 0) the KL penalty alone must lower the KL to the reference (another
    random model here); with its sign flipped it would raise it."""
    actor, batch, trajectories, config, learners, score_rows, update = _one_term_update(tokenizer, "kl")
    before = _mean_kl(score_rows(actor, batch, config, "cpu"), batch.ref_logprobs, batch.mask)
    stats = update(batch, trajectories, config, learners, 0)
    after = _mean_kl(score_rows(actor, batch, config, "cpu"), batch.ref_logprobs, batch.mask)
    assert stats["losses/kl"] > 0 and after < 0.9 * before, (before, after)


def test_the_entropy_bonus_raises_the_policys_entropy(tokenizer):
    """With no policy gradient the entropy bonus alone must raise the entropy of the policy on the loss tokens."""
    actor, batch, trajectories, config, learners, _, update = _one_term_update(tokenizer, "entropy")

    def entropy():
        ids, attention, keep, _ = batch.rows([0, 1], "cpu")
        with torch.no_grad():
            return float(actor.model(ids, attention, keep)[1].mean())

    before = entropy()
    update(batch, trajectories, config, learners, 0)
    assert entropy() > before + 1e-3, (before, entropy())


def test_the_world_model_term_lowers_the_nll_of_the_true_states(tokenizer):
    """With no policy gradient the world-model loss alone must make the true states' tokens more likely."""
    actor, batch, trajectories, config, learners, _, update = _one_term_update(tokenizer, "world-model")
    ids, wm_mask = trajectories[0].world_model
    ids_t = torch.tensor([ids])
    keep = torch.tensor([wm_mask[1:]], dtype=torch.bool)

    def nll():
        with torch.no_grad():
            return -float(actor.model(ids_t, torch.ones_like(ids_t), keep, temperature=1.0)[0].sum())

    before = nll()
    stats = update(batch, trajectories, config, learners, 0)
    assert stats["losses/world_model"] > 0 and nll() < before - 1e-2, (before, nll())


@pytest.mark.parametrize(("loss", "sft_coef"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_a_dpo_update_is_the_gradient_of_the_dpo_loss_on_the_agents_tokens_only(tokenizer, monkeypatch, loss,
                                                                                 sft_coef):
    """`dpo_update`'s two-pass gradient (log-probs without gradient, then one micro-batch at a time) is the
    gradient of the DPO loss written directly, over a pair of two-turn episodes whose environment text between the
    turns carries no loss; the same loss with the environment's tokens counted has another gradient (so this test
    would catch them being trained on)."""
    from conftest import build_tiny_model

    from spa_rl.rl import core
    from spa_rl.rl.episodes import Trajectory
    from spa_rl.rl.models import PolicyModel
    from spa_rl.rl.trainer import Learners, dpo_update, score_rows
    from spa_rl.training import Trainable, make_accelerator, resolve_precision

    torch.manual_seed(2)
    trajectories = []
    for score in (1.0, 0.0):
        ids = torch.randint(10, 500, (30,)).tolist()
        mask = [0] * 8 + [1] * 6 + [0] * 7 + [1] * 9  # prompt, turn 1, the environment's reply, turn 2
        trajectories.append(Trajectory(ids, mask, mask, [0.0] * 30, [0.0] * 30, 0, score))
    config = RLConfig.make(out="x", algorithm="dpo", dpo_loss=loss, dpo_beta=0.5, dpo_sft_coef=sft_coef,
                           keep_ratio=1.0, puzzles_per_step=1, samples_per_puzzle=2, micro_batch_size=1,
                           dtype="fp32")
    actor = Trainable(PolicyModel(build_tiny_model(tokenizer).eval()), resolve_precision("fp32", "cpu", training=True),
                      make_accelerator("cpu"), lr=1e-3, total_steps=1, schedule="constant", max_grad_norm=1e9)
    reference = PolicyModel(build_tiny_model(tokenizer, seed=1).eval().requires_grad_(False))
    batch = Batch.of(trajectories, pad_id=0)
    batch.ref_logprobs = score_rows(reference, batch, config, "cpu", autocast=actor.autocast)
    batch.old_logprobs = score_rows(actor, batch, config, "cpu")

    def direct(mask):  # the DPO loss of the pair written out, and its gradient, at the actor's current weights
        ids, attention, _, width = batch.rows([0, 1], "cpu")
        keep = mask[:, :width - 1].bool()
        logp = torch.zeros(keep.shape).masked_scatter(keep, actor.model(ids, attention, keep)[0])
        ref = torch.zeros(keep.shape).masked_scatter(keep, reference(ids, attention, keep)[0])
        per = mask.sum(-1) if loss == "ipo" else torch.ones(2)
        seq, ref = logp.sum(-1) / per, ref.sum(-1) / per
        value = core.dpo_loss(seq[:1], seq[1:], ref[:1], ref[1:], 0.5, loss)[0].sum()
        (value - sft_coef * logp[0].sum() / mask[0].sum()).backward()
        grads = [p.grad.clone() for p in actor.params]
        actor.optimizer.zero_grad(set_to_none=True)
        return float(value.detach()), grads

    value, expected = direct(batch.mask)
    with_environment = batch.mask.clone()
    with_environment[:, 7:] = 1.0  # every token after the prompt, the environment's reply included
    _, wrong = direct(with_environment)
    captured = []
    real_step = actor.step
    monkeypatch.setattr(actor, "step", lambda: captured.append([p.grad.clone() for p in actor.params]) or real_step())
    stats = dpo_update(batch, config, Learners(actor, None, reference, None, tokenizer, actor.accelerator, False))
    assert stats["dpo/pairs"] == 1 and stats["rewards/accuracies"] in (0.0, 1.0)
    assert stats["losses/dpo_loss"] == pytest.approx(value, rel=1e-5)
    (got,) = captured
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(g, w, rtol=1e-3, atol=1e-6) for g, w in zip(got, wrong, strict=True))


def test_dpo_runs_end_to_end_logs_trls_names_and_resumes_exactly(tiny_model_dir, tmp_path, tokenizer, monkeypatch):
    """`--algorithm dpo` over scripted play whose episodes differ (some turns break the format, so scores vary within
    a puzzle's group): pairs form, the actor moves, the metrics carry TRL's names, no critic is trained, and a run
    killed at its third step resumes to the weights of one run straight through."""
    from test_rollout import ScriptedBackend

    import spa_rl.rl.trainer as trainer

    class Scripted(ScriptedBackend):
        def reset(self):
            pass

    good = "<think> <observation> x </observation> go <prediction> y </prediction> </think> <answer> {} </answer>"
    texts = [good.format("Right"), "no format at all", good.format("Down"), good.format("Down")]
    monkeypatch.setattr(trainer, "make_backend", lambda *a, **k: Scripted(tokenizer, texts))
    settings = dict(steps=3, save_every=1, algorithm="dpo", dpo_sft_coef=0.1, eval_before=False)
    straight = train_rl(_config(tmp_path / "a", tiny_model_dir, **settings), quiet=True)
    rows = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "dpo/pairs" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["dpo/pairs"] > 0 for r in rows), "scripted play gives groups whose scores differ"
    for key in ("losses/dpo_loss", "losses/sft_nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "losses/grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0, "the actor starts as its reference"
    assert rows[0]["losses/dpo_loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert 0 <= rows[-1]["rewards/accuracies"] <= 1 and "losses/value_loss" not in rows[0]
    assert not (tmp_path / "a" / "critic").exists() and (tmp_path / "a" / "curves.png").is_file()
    original = trainer.rl_step
    monkeypatch.setattr(trainer, "rl_step", killed_on_call(original, 3))
    with pytest.raises(KeyboardInterrupt):
        train_rl(_config(tmp_path / "b", tiny_model_dir, **settings), quiet=True)
    monkeypatch.setattr(trainer, "rl_step", original)
    assert train_rl(_config(tmp_path / "b", tiny_model_dir, **settings), quiet=True) == straight
    a, b = load_file(tmp_path / "a" / "model" / "model.safetensors"), load_file(tmp_path / "b" / "model" /
                                                                                "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in start), "the actor trained"


def test_offline_dpo_trains_on_a_collected_datasets_pairs(tiny_model_dir, tmp_path):
    """`--dpo-data`: pairs from a `spa collect` dataset (random play on FrozenLake wins some episodes of a puzzle and
    loses others), nothing played but the validation; a dataset whose every puzzle ends alike (the solver always
    wins) gives no pair and is refused in one line."""
    from conftest import collect_data

    collect_data("frozenlake-det", tmp_path / "random", policy="random", puzzles=12, samples=4, format="plain",
                 val_fraction=0.0, filter_malformed=False)
    result = train_rl(_config(tmp_path / "run", tiny_model_dir, steps=2, algorithm="dpo", format="plain",
                              dpo_data=str(tmp_path / "random"), puzzles_per_step=2, samples_per_puzzle=1,
                              eval_before=False), quiet=True)
    assert result["steps"] == 2 and "val/pass@1" in result
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "dpo/pairs" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["dpo/pairs"] > 0 for r in rows)
    assert all(2 <= r["data/episodes"] <= 8 for r in rows) and "rollout/success" not in rows[0]  # (duplicates dropped)
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    collect_data("frozenlake-det", tmp_path / "solver", policy="solver", puzzles=3, samples=2, format="plain",
                 val_fraction=0.0, filter_malformed=False)
    collect_data("frozenlake-det", tmp_path / "filtered", policy="random", puzzles=2, samples=2, format="plain",
                 val_fraction=0.0)
    for data, settings, message in (
            ("solver", {}, "no puzzle with both a success and a failure"),
            ("filtered", {}, "collect it again with --no-filter"),
            ("random", {"format": "world-model"}, "was collected with --format plain, this run plays --format world")):
        with pytest.raises(SpaError, match=message):
            train_rl(_config(tmp_path / f"run-{data}", tiny_model_dir, steps=1, algorithm="dpo",
                             dpo_data=str(tmp_path / data), eval_before=False, **{"format": "plain", **settings}),
                     quiet=True)
