"""Baselines measured beside KNE."""

from .ft_m import ft_m

__all__ = ["ft_m"]
