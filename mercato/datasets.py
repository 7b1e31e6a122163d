"""What the profile service's dataset adapters and the training package share: the error
an adapter raises when it cannot produce its data set.

Adapters live where their data does (``services.profile.datasets`` for files,
``training.profile_data`` for the synthetic shop); the ``mercato`` command registers the
training one with the profile service (:func:`services.profile.datasets.register_adapter`),
so neither package imports the other.
"""

from __future__ import annotations


class DatasetUnavailable(Exception):
    """The adapter cannot produce this dataset (missing file, adapter not registered)."""


__all__ = ["DatasetUnavailable"]
