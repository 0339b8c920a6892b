"""spin: Self-Play Fine-Tuning (Chen et al., ICML 2024, arXiv 2401.01335) in one command.

import spin
summary = spin.run(spin.load_config("recipes/cpu-tiny.yaml"))
"""

from spin.api import evaluate, generate, run, train
from spin.config import SpinConfig, load_config
from spin.errors import SpinError

__version__ = "0.1.0"
__all__ = ["SpinConfig", "SpinError", "evaluate", "generate", "load_config", "run", "train"]
