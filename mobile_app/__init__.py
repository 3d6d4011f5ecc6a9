"""Kivy app that classifies blood / bone-marrow cell photos with an exported MobileViT (torch-free)."""

__version__ = "0.1.0"
