"""Adapters for training frameworks (Lightning, the Hugging Face ``Trainer``, Accelerate).

Each submodule imports its framework; importing :mod:`imbalance_losses` never does. Install the
matching extra first, e.g. ``pip install "imbalance-losses[lightning]"``.
"""
