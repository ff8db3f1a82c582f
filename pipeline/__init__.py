"""Batch captioning and visual question answering of videos and images with LLaVA models on Ray.

Importing this package is cheap: torch, transformers, av and ray are imported inside the functions
and actors that use them.
"""
