#!/usr/bin/env bash
# `spa imagine` for the embedded model before and after world-model SFT, on FrozenLake and Sokoban
# (docs/results.md, "Imagination"). FrozenLake reuses the main job's run (`python3 run.py`, runs/spa-cpu);
# Sokoban runs the spa recipe's warm start, self-play and SFT at the cpu preset (no RL), in runs/spa-cpu-sokoban.
# Every model plays the same 16 validation puzzles once (temperature 1, as in the runs).
#   bash scripts/imagine.sh           then: python scripts/imagine_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
SPA=".venv/bin/spa"
PUZZLES=16
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
