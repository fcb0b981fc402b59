"""Stage 3 of the method (docs/method.md §6): RL from the world-model checkpoint. `core.py` holds the maths as
pure tensor functions, `episodes.py` turns played episodes into token sequences with rewards and masks,
`models.py` the policy and critic networks, `trainer.py` the PPO loop (`spa train`).

This package must never hold plumbing that SFT shares (that is `spa_rl.training`).
"""
