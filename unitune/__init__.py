"""unitune: fine-tune pretrained models with one recipe format, one CLI and one Python API."""
__version__ = "0.1.0"  # first: modules imported below read it (data/cache.py keys its entries with it)

from unitune.api import Run, evaluate, load_run_or_model, merge, score, train
from unitune.config import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "Run", "evaluate", "load_recipe", "load_run_or_model", "merge", "score", "train"]
