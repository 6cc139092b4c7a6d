"""Training: ``TrainConfig`` and its recipes (``config``), the loop's parts (``loop``), kill-and-resume
(``resume``) and ``train(cfg)`` itself (``run``)."""

from aimonk.train.config import ORIGINAL_RECIPE, PRETRAINED_12EP_RECIPE, PRETRAINED_RECIPE, RECIPES, TrainConfig, recipe_config
from aimonk.train.loop import TrainingError, train_one_epoch, train_transform
from aimonk.train.run import TrainResult, prepare_data, train

__all__ = ["ORIGINAL_RECIPE", "PRETRAINED_12EP_RECIPE", "PRETRAINED_RECIPE", "RECIPES", "TrainConfig", "TrainResult", "TrainingError",
           "prepare_data", "recipe_config", "train", "train_one_epoch", "train_transform"]
