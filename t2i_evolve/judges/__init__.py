"""Judges of prompt following. `PixelJudge` is exact for the shapes world."""

from .pixel import PixelJudge

__all__ = ["PixelJudge"]
