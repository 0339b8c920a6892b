"""spinlm: Self-Play Fine-Tuning (Chen et al., ICML 2024, arXiv 2401.01335) in one command.

import spinlm
summary = spinlm.run(spinlm.load_config("recipes/cpu-tiny.yaml"))
"""

from spinlm.api import evaluate, generate, run, train
from spinlm.config import SpinConfig, load_config
from spinlm.errors import SpinError

__version__ = "0.1.0"
__all__ = ["SpinConfig", "SpinError", "evaluate", "generate", "load_config", "run", "train"]
