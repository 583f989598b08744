"""Backbone construction and checkpoint loading."""
from models.backbones import build_backbone, weights_fingerprint

__all__ = ["build_backbone", "weights_fingerprint"]
