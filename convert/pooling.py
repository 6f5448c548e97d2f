"""Head pooling from the weights alone: kept importable here (torch-free); the code lives in convert.methods."""

from .methods.pooling import WEIGHT_ONLY_POOLS, Array, first_pool, grouped, mean_pool, relative_error

__all__ = ["WEIGHT_ONLY_POOLS", "Array", "first_pool", "grouped", "mean_pool", "relative_error"]
