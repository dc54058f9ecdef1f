"""Per-family default recipes for small images (16-32 px, a few thousand samples), as data.

`auto_recipe(family, batch_size)` returns {"train": TrainConfig field overrides, "model": {"options": ...}},
shaped like a pipeline file's train stage and `model:` section. Learning rates are given for a reference batch
of 64 and scaled linearly with the batch size (Goyal et al., 2017).

Where the values come from (issue 10): seeded CPU runs on the procedural `shapes` dataset, 16x16, 4 classes,
stem cifar. "Short run" = grey images, 2,000 samples (400 val), batch 32, 100-150 optimizer steps, the setting of
tests/test_zoo_learning.py; "6-epoch run" = RGB, 3,000 samples, batch 64, 228 steps. Chance is 25%.

- Optimizer: SGD, momentum 0.9, Nesterov, warm-up then cosine, for every family. In short runs it beat AdamW
  (lr 2e-3 at batch 32, weight decay 0.05): EfficientNet-B0 58% vs 43%, GoogLeNet 57% vs 49%, MobileNetV2 42% vs
  34% (150 steps); for ResNet-18 in the 6-epoch run 49% vs 42% (AdamW reached 96% train: it overfits).
- lr 0.1 at batch 64 for ResNet and EfficientNet; 0.2 for MobileNetV2 and GoogLeNet, which learned faster with it
  in two seeds each (MobileNetV2 46/49% vs 42/35%, GoogLeNet 46/46% vs 41/34%); EfficientNet did not
  (seed 0: 51% at 0.1 vs 44% at 0.2; seed 1: 47% at both).
- grad_clip_norm 2.0 for MobileNetV2, EfficientNet and GoogLeNet. MobileNetV2's first epoch without it: train loss
  2.5-3.0 (SGD 0.05-0.1 at batch 32, with warm-up) against ln 4 = 1.39, 1.41 with it; its 1,280-wide head moves
  the logits far faster per lr step than ResNet's 128-wide fc. EfficientNet's first epochs under plain SGD sat
  above ln 4 (1.64-1.79), and GoogLeNet's loss rose in its second epoch (1.47 -> 1.58). ResNet-18's first epoch
  is stable without it, so it gets none.
- weight_decay 4e-5 for the depthwise families (torchvision's MobileNetV2 value: a depthwise filter has nine
  weights, and decaying them hurts), 5e-4 (the CIFAR ResNet value) for ResNet and GoogLeNet.
- label_smoothing 0: 0.1 did not help (ResNet-18 short run: 55.0% vs 55.5%), and plain CE keeps train/val comparable.
- Model options. dropout: EfficientNet 0 (short run 51% vs 43% with its default 0.2), GoogLeNet and MobileNetV2
  keep their default 0.2 (GoogLeNet 56% vs 46% without it, MobileNetV2 49% vs 46%), ResNet its default 0.
  stochastic_depth 0 for EfficientNet (its defaults dropout 0.2 + stochastic depth 0.2 cost 3 points in a
  150-step AdamW run, 36% vs 39%). depth_mult 0.5 for MobileNetV2/EfficientNet (MobileNetV2 short run: 42% vs 37%
  at full depth, in 66% of the time). GoogLeNet at width 0.125: its cifar stem keeps the Inception-3 modules at
  full resolution, ~7x ResNet-18's step time at equal width. The others at width 0.25.
- epochs 15, a suggestion for a few thousand images: ResNet-18 on 3,000 RGB 16x16 samples (plain SGD) reached
  62% val at epoch 10 and 72% from epoch 13 on. The other families were not run that long with these recipes.
"""

from __future__ import annotations

import copy
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.train.config import TrainConfig

REFERENCE_BATCH = 64  # the batch size the learning rates below are stated at

_SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True}
_SCHEDULE = {"name": "warmup_cosine", "warmup_epochs": 0.5}
_LOSS = {"name": "cross_entropy", "label_smoothing": 0.0}

_RECIPES: dict[str, dict[str, Any]] = {
    "resnet": {
        "train": {
            "epochs": 15,
            "optimizer": {**_SGD, "lr": 0.1, "weight_decay": 5e-4},
            "schedule": _SCHEDULE,
            "loss": _LOSS,
            "grad_clip_norm": None,  # its first epoch is stable without
        },
        "model": {"options": {"stem": "cifar", "width_mult": 0.25, "dropout": 0.0}},
    },
    "mobilenet": {
        "train": {
            "epochs": 15,
            "optimizer": {**_SGD, "lr": 0.2, "weight_decay": 4e-5},
            "schedule": _SCHEDULE,
            "loss": _LOSS,
            "grad_clip_norm": 2.0,  # the wide head's logits blow up in the first epoch without it
        },
        "model": {"options": {"stem": "cifar", "width_mult": 0.25, "depth_mult": 0.5, "dropout": 0.2}},
    },
    "efficientnet": {
        "train": {
            "epochs": 15,
            "optimizer": {**_SGD, "lr": 0.1, "weight_decay": 4e-5},
            "schedule": _SCHEDULE,
            "loss": _LOSS,
            "grad_clip_norm": 2.0,
        },
        "model": {
            "options": {"stem": "cifar", "width_mult": 0.25, "depth_mult": 0.5, "dropout": 0.0, "stochastic_depth": 0.0}
        },
    },
    "inception": {
        "train": {
            "epochs": 15,
            "optimizer": {**_SGD, "lr": 0.2, "weight_decay": 5e-4},
            "schedule": _SCHEDULE,
            "loss": _LOSS,
            "grad_clip_norm": 2.0,  # plain SGD's loss rose in its second epoch
        },
        "model": {"options": {"stem": "cifar", "width_mult": 0.125, "dropout": 0.2}},
    },
}


# A user's own model (no zoo family): the practitioner's AdamW + one-cycle. Measured with bench/strong_cnn.py as the
# user model, batch 128, bf16, on photo-patches and glyphs (bench/imagefolder_benchmark.py's datasets), val top-1:
# - AdamW + one-cycle (peak 1e-2 at batch 128), 8 epochs: photo-patches 97.67% / 97.72% (seeds 0 / 1), glyphs
#   94.65% / 92.30%. SGD + Nesterov, warm-up then cosine (lr 0.2 at batch 128), 8 epochs: 97.47% / 97.57% and
#   92.20% / 91.40%. The ResNet recipe, which user models took before (SGD, 15 epochs): 99.11% and 97.10%, in ~1.8x
#   the time; more epochs is what it bought, so a time budget (time_budget_s) is the way to spend spare time.
# - label smoothing 0.1 against 0 (SGD, 8 epochs): photo-patches 97.47% vs 97.37%, glyphs 92.20% vs 93.45% - within
#   the seed-to-seed spread, so the practitioner's 0.1 stays.
# (All of the above with the random crop padding black. Padding with the mean colour, as now, AdamW 8 epochs on
# glyphs: 96.65% / 93.20% for seeds 0 / 1 - the seed alone moves glyphs by up to 3.5 points, photo-patches by ~0.1.)
GENERIC = "generic"
_GENERIC = {
    "train": {
        "epochs": 8,
        "optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05},
        "schedule": {"name": "onecycle", "pct_start": 0.3},  # peaks at 10x the lr: 5e-3 at batch 64
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "grad_clip_norm": None,
    },
    "model": {"options": {}},
}


def families() -> list[str]:
    """The zoo families that have a recipe (a user's own model takes GENERIC)."""
    return list(_RECIPES)


def auto_recipe(family: str, batch_size: int) -> dict[str, Any]:
    """{"train": TrainConfig overrides, "model": {"options": ...}} for `family` at `batch_size`.

    The learning rate is the reference one times batch_size / REFERENCE_BATCH. The result is a fresh copy that
    the caller may change; `TrainConfig.model_validate(recipe["train"])` accepts its train part as it is.
    """
    if family not in (*_RECIPES, GENERIC):
        raise DeploykitError(
            f"No small-image recipe for the model family {family!r}: use one of {', '.join(_RECIPES)} "
            f"(each model's family is listed by `deploykit models`), or {GENERIC!r} for a model of your own."
        )
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DeploykitError(f"batch_size={batch_size!r} is invalid for auto_recipe: use a whole number of at least 1.")
    recipe = copy.deepcopy(_GENERIC if family == GENERIC else _RECIPES[family])
    train = recipe["train"]
    train["batch_size"] = batch_size
    train["optimizer"]["lr"] *= batch_size / REFERENCE_BATCH  # linear scaling rule
    return recipe


def apply_recipe(cfg: TrainConfig, family: str) -> tuple[TrainConfig, dict[str, Any]]:
    """`cfg` with every training field the pipeline file left unset taken from the family's recipe (a field set in
    the file, even partly, stays the file's), and the fields taken. The model options are not applied: they change
    the architecture, so they stay the file's choice."""
    recipe = auto_recipe(family, cfg.batch_size)["train"]
    taken = {key: value for key, value in recipe.items() if key not in cfg.model_fields_set}
    return type(cfg).model_validate({**cfg.model_dump(exclude_unset=True), **taken}), taken
