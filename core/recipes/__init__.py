"""Recipes: the engine's built-in pretrain and SFT recipes, their datasets and losses."""
