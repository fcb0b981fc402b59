"""Stage 3 of the method (docs/method.md §6): RL from the world-model checkpoint. `core.py` holds the maths
as pure tensor functions; the trainer that uses them comes next.

This package must never hold plumbing that SFT shares (that is `spa_rl.training`).
"""
