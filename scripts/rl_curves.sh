#!/usr/bin/env bash
# RL learning curves of the embedded model from a world-model SFT checkpoint (docs/results.md, "RL from the
# world-model checkpoint"). The SFT checkpoint is the spa recipe's warm start, self-play and SFT at the cpu
# preset (`spa run spa --stages collect,sft`); every arm then trains 30 steps from it with `spa train` on
# the same puzzles, seeds and budget, validating every 10 steps on 8 puzzles x 8 samples.
#   bash scripts/rl_curves.sh ENV ARM...     ENV: frozenlake-det | sokoban
#   ARM: grpo | ppo | ppo-wm (PPO + world-model loss 0.1) | ppo-curiosity (PPO + curiosity bonus 0.1)
#   then: python scripts/rl_table.py runs/curves
# One PPO step is 4 puzzles x 4 samples with the best half of the groups kept (8 episodes, one minibatch),
# at actor lr 1e-5: the paper's 1e-6 is sized for 64-episode minibatches; in the main job, 3 such steps at 1e-6
# moved validation Pass@1 only within sampling noise (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SPA=".venv/bin/spa"
ENV=${1:?usage: bash scripts/rl_curves.sh ENV ARM...}
shift
SFT=runs/curves/$ENV-sft
# A finished SFT checkpoint is reused as it is: the run directory also records the RL settings' defaults, and a
# later change of one of them (the KL estimator's) must not make the arms start from different checkpoints.
if [[ -f $SFT/sft/result.json ]]; then
  echo "reusing the SFT checkpoint $SFT/sft/model"
else
  "$SPA" run spa --env "$ENV" --stages collect,sft --out "$SFT"
fi
for arm in "$@"; do
  case $arm in
    grpo) extra=(--advantage grpo) ;;
    ppo) extra=(--advantage gae) ;;
    ppo-wm) extra=(--advantage gae --world-model-coef 0.1) ;;
    ppo-curiosity) extra=(--advantage gae --curiosity-coef 0.1) ;;
    *) echo "unknown arm $arm (grpo, ppo, ppo-wm, ppo-curiosity)" >&2; exit 2 ;;
  esac
  "$SPA" train --init "$SFT/sft/model" --env "$ENV" --render grid+coords --format world-model \
    --max-new-tokens 256 --steps 30 --puzzles-per-step 4 --samples-per-puzzle 4 --keep-ratio 0.5 \
    --minibatch-size 8 --actor-lr 1e-5 --eval-every 10 --eval-puzzles 8 --eval-samples 8 --save-every 1 \
    "${extra[@]}" --out "runs/curves/$ENV-$arm"
done
