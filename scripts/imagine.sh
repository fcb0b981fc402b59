#!/usr/bin/env bash
# `spa imagine` for the embedded model before and after world-model SFT, on FrozenLake and Sokoban
# (docs/results.md, "Imagination"). FrozenLake reuses the main job's run (`python3 run.py`, runs/spa-cpu);
# Sokoban runs the spa recipe's warm start, self-play and SFT at the cpu preset (no RL), in runs/spa-cpu-sokoban.
# Every model plays the same 16 validation puzzles once (temperature 1, as in the runs).
#   bash scripts/imagine.sh           then: python scripts/imagine_table.py
# With `rl ENV`: the RL arms of scripts/rl_curves.sh instead (their SFT checkpoint and each finished arm's actor),
# in runs/imagine-rl/ENV-*:
#   bash scripts/imagine.sh rl frozenlake-det   then: python scripts/imagine_table.py runs/imagine-rl
set -euo pipefail
cd "$(dirname "$0")/.."
SPA=".venv/bin/spa"
PUZZLES=16
if [ "${1:-}" = rl ]; then
  env=${2:?usage: bash scripts/imagine.sh rl ENV}
  for model in runs/curves/$env-sft/sft/model runs/curves/$env-*/model; do
    [ -f "$model/config.json" ] || continue
    name=$(basename "$(dirname "$model")"); [ "$name" = sft ] && name=$env-sft
    [ -f "runs/imagine-rl/$name/imagine.json" ] && continue
    "$SPA" imagine --model "$model" --env "$env" --render grid+coords --max-new-tokens 256 \
      --puzzles "$PUZZLES" --out "runs/imagine-rl/$name"
  done
  exit 0
fi
[ -f runs/spa-cpu/report.html ] || python3 run.py
"$SPA" run spa --env sokoban --stages collect,sft --out runs/spa-cpu-sokoban
for env in frozenlake sokoban; do
  run=runs/spa-cpu; [ "$env" = sokoban ] && run=runs/spa-cpu-sokoban
  for stage in base warm-start sft; do
    case $stage in
      base) model=smollm2-135m ;;
      warm-start) model=$run/warm-start/sft/model ;;
      sft) model=$run/sft/model ;;
    esac
    "$SPA" imagine --model "$model" --env "$env" --render grid+coords --max-new-tokens 256 \
      --puzzles "$PUZZLES" --out "runs/imagine/$env-$stage"
  done
done
