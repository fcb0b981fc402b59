#!/usr/bin/env bash
# World-model acquisition on CPU scale (docs/results.md, "World-model SFT"): every number of that section comes
# from this script. Stages are resumable (each spa command skips finished work), so rerun after an interruption.
#   bash scripts/world_model.sh cold        # cold start: random self-play data, SFT, eval, novelty
#   bash scripts/world_model.sh compare     # novelty-guided vs random self-play from the cold-started model, 3 seeds
#   bash scripts/world_model.sh rounds      # two rounds of (random self-play, SFT) from the cold-started model
#   bash scripts/world_model.sh greedy      # the cold-started model evaluated greedily (temperature 0)
#   bash scripts/world_model.sh more        # the cold-started model fine-tuned on 4x more fresh random self-play
#   bash scripts/world_model.sh precision   # the cold start's SFT again in each precision (bf16 with fp32 master
#                                           # weights, the default since 2026-11-22; bf16 autocast, the one before)
set -euo pipefail
OUT=${OUT:-runs/wm}
ENV_NAME=${ENV_NAME:-sokoban}
COLD=$OUT/cold/sft/model

cold() {
  spa collect --env "$ENV_NAME" --policy random --puzzles 48 --samples 4 --first-seed 0 --out "$OUT/cold/data"
  [ -f "$COLD/config.json" ] || spa sft --data "$OUT/cold/data" --out "$OUT/cold/sft" --epochs 2 --micro-batch-size 1 \
    --env "$ENV_NAME"
  [ -f "$OUT/cold/eval/metrics.json" ] || spa eval --model "$COLD" --env "$ENV_NAME" --puzzles 32 --samples 2 \
    --out "$OUT/cold/eval"
  [ -f "$OUT/cold/novelty.json" ] || spa novelty --model "$COLD" --env "$ENV_NAME" --puzzles 32 \
    --out "$OUT/cold/novelty.json"
}

compare() {
  for seed in 1 2 3; do
    first=$((1000 * seed))
    for policy in random novelty; do
      dir=$OUT/compare/$policy-seed$seed
      extra=()
      [ "$policy" = novelty ] && extra=(--novelty-actor random --model "$COLD")
      spa collect --env "$ENV_NAME" --policy "$policy" ${extra[@]+"${extra[@]}"} --puzzles 16 --samples 4 \
        --first-seed "$first" --seed "$seed" --out "$dir/data"
      [ -f "$dir/sft/model/config.json" ] || spa sft --data "$dir/data" --out "$dir/sft" --model "$COLD" \
        --epochs 1 --batch-size 4 --micro-batch-size 1 --max-samples 96 --seed "$seed" --env "$ENV_NAME"
      [ -f "$dir/eval/metrics.json" ] || spa eval --model "$dir/sft/model" --env "$ENV_NAME" --puzzles 32 \
        --samples 1 --seed "$seed" --out "$dir/eval"
    done
  done
}

rounds() {
  spa selfplay --env "$ENV_NAME" --model "$COLD" --policy random --rounds 2 --puzzles 8 --samples 4 --epochs 1 \
    --first-seed 10000 --out "$OUT/rounds"
}

greedy() {
  [ -f "$OUT/cold/eval-greedy/metrics.json" ] || spa eval --model "$COLD" --env "$ENV_NAME" --puzzles 32 --samples 1 \
    --temperature 0 --out "$OUT/cold/eval-greedy"
}

more() {
  spa collect --env "$ENV_NAME" --policy random --puzzles 192 --samples 4 --first-seed 48 --out "$OUT/more/data"
  [ -f "$OUT/more/sft/model/config.json" ] || spa sft --data "$OUT/more/data" --out "$OUT/more/sft" --model "$COLD" --save-every 20 \
    --epochs 1 --micro-batch-size 1 --env "$ENV_NAME"
  [ -f "$OUT/more/eval/metrics.json" ] || spa eval --model "$OUT/more/sft/model" --env "$ENV_NAME" --puzzles 32 \
    --samples 2 --out "$OUT/more/eval"
  [ -f "$OUT/more/eval-greedy/metrics.json" ] || spa eval --model "$OUT/more/sft/model" --env "$ENV_NAME" \
    --puzzles 32 --samples 1 --temperature 0 --out "$OUT/more/eval-greedy"
}

precision() {
  for dtype in bf16 bf16-autocast; do
    [ -f "$OUT/precision/$dtype/model/config.json" ] || spa sft --data "$OUT/cold/data" --out "$OUT/precision/$dtype" \
      --epochs 2 --micro-batch-size 1 --env "$ENV_NAME" --dtype "$dtype"
  done
}

for stage in "${@:-cold}"; do "$stage"; done
