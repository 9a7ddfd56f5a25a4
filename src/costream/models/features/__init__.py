"""Feature models: OadTR and CoOadTR over per-frame features, and the THUMOS'14 feature
helpers (loading, padding, per-frame mAP).

The public names are re-exported by :mod:`costream.models`.

Example:
    >>> from costream.models.features import average_precision
    >>> import torch
    >>> float(average_precision(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])))
    1.0
"""

from ._oadtr import CoOadTR, OadTR
from ._thumos import (
    ThumosFeatures,
    average_precision,
    load_thumos_features,
    pad_start,
    per_frame_map,
)

__all__ = ["CoOadTR", "OadTR", "ThumosFeatures", "average_precision", "load_thumos_features",
           "pad_start", "per_frame_map"]
