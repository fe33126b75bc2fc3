"""Training: recipes, options, the run config, the fit/evaluate loop, checkpoints, transfer."""

from vitlab.train.engine import FitResult, evaluate, fit
from vitlab.train.options import TrainOptions
from vitlab.train.recipe import RECIPES, Recipe, recipe
from vitlab.train.runconfig import RunConfig
from vitlab.train.transfer import load_encoder_weights

__all__ = ["RECIPES", "FitResult", "Recipe", "RunConfig", "TrainOptions", "evaluate", "fit",
           "load_encoder_weights", "recipe"]
