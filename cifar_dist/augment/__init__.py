"""Batched, on-device augmentation: the recipe (recipe.py), geometric and colour ops, mixup/cutmix, the pipeline."""
