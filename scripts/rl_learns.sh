#!/usr/bin/env bash
# Does RL improve the agent on a CPU? (issue 26, item 4; docs/results.md, "RL that learns".)
# FrozenLake 4x4 deterministic, plain format (actions only: the cheapest turns). The embedded model is first
# taught to play by SFT on the solver's episodes (it never writes the format zero-shot, and a short SFT leaves a
# policy that wins some puzzles: something for RL to improve), then trained with GRPO, validating on 64 held-out
# puzzles x 4 samples before the first step and every EVERY steps.
#   bash scripts/rl_learns.sh                 # defaults below; settings by environment variable:
#   SEED=1 LR=5e-6 STEPS=40 PER_STEP=16 SAMPLES=8 bash scripts/rl_learns.sh
#   EXTRA="--kl-coef 0.05" TAG=-kl bash scripts/rl_learns.sh     # any other `spa train` flags, and a name for them
#   ALGO=dpo EXTRA="--dpo-sft-coef 0.1" bash scripts/rl_learns.sh  # iterated DPO instead of GRPO
# Writes runs/learns/solver (the SFT data), runs/learns/sft-e$EPOCHS (the starting checkpoint) and
# runs/learns/$ALGO-e$EPOCHS-lr$LR-p${PER_STEP}x$SAMPLES$TAG-s$SEED (the RL run: metrics.jsonl, curves.png). Every stage
# resumes when rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
SPA=".venv/bin/spa"
ENV=frozenlake-det
PUZZLES=${PUZZLES:-1130}   # solver episodes for the SFT data: 1,108 training turns
EPOCHS=${EPOCHS:-2}        # SFT epochs: the starting policy (2: about 30% Pass@1, 4: about 70%)
SEED=${SEED:-0}
LR=${LR:-1e-5}
STEPS=${STEPS:-20}
EVERY=${EVERY:-10}
PER_STEP=${PER_STEP:-8}    # puzzles per step
SAMPLES=${SAMPLES:-4}      # samples per puzzle (GRPO's group; DPO's pairs come from it)
ALGO=${ALGO:-grpo}         # grpo (PPO with group-normalised advantages) or dpo
OUT=runs/learns
if [[ ! -f $OUT/solver/manifest.json ]]; then
  "$SPA" collect --env $ENV --policy solver --format plain --puzzles "$PUZZLES" --samples 1 --val-fraction 0.05 \
    --out $OUT/solver
fi
SFT=$OUT/sft-e$EPOCHS
if [[ ! -f $SFT/result.json ]]; then
  "$SPA" sft --data $OUT/solver --env $ENV --epochs "$EPOCHS" --out "$SFT"
fi
if [[ $ALGO == dpo ]]; then METHOD="--algorithm dpo"; else METHOD="--advantage grpo"; fi
"$SPA" train --init "$SFT/model" --env $ENV --format plain $METHOD --keep-ratio 1 --seed "$SEED" \
  --steps "$STEPS" --puzzles-per-step "$PER_STEP" --samples-per-puzzle "$SAMPLES" \
  --minibatch-size $((PER_STEP * SAMPLES)) --actor-lr "$LR" --eval-every "$EVERY" --eval-puzzles 64 \
  --eval-samples 4 --save-every 5 ${EXTRA:-} --out "$OUT/$ALGO-e$EPOCHS-lr$LR-p${PER_STEP}x$SAMPLES${TAG:-}-s$SEED"
