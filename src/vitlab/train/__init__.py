"""Training: recipes, the fit/evaluate loop, checkpoints and encoder transfer."""

from vitlab.train.engine import FitResult, TrainOptions, evaluate, fit
from vitlab.train.recipe import RECIPES, Recipe, recipe
from vitlab.train.transfer import load_encoder_weights

__all__ = ["RECIPES", "FitResult", "Recipe", "TrainOptions", "evaluate", "fit",
           "load_encoder_weights", "recipe"]
