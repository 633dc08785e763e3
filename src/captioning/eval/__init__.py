"""Evaluation: coco-caption metrics, diversity, `evaluate` (a checkpoint on a split), `score` (any
predictions against any references) and the figures (history plots, captions on images, attention
maps).

May import `captioner`, `decode`, `model`, `data` and the foundation.
"""
