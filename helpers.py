"""Preparing an upload for the model, as the mission's layout names it; the code is imgserve/imaging/prepare.py."""

from imgserve.imaging.prepare import DecodeBudget, DecodeBusy, ImageError, prepare_image

__all__ = ["DecodeBudget", "DecodeBusy", "ImageError", "prepare_image"]
