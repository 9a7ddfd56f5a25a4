"""Video models: X3D, Slow-R50 and I3D-R50 (offline and continual, Co3D arXiv 2106.00050).

Also the Kinetics-400 class names. The public names are re-exported by :mod:`costream.models`.

Example:
    >>> from costream.models.video import X3D
    >>> X3D("xs", num_classes=4).input_shape
    (3, 4, 160, 160)
"""

from ._kinetics import kinetics400_classes
from ._resnet3d import ResNet3D
from ._se import SqueezeExcitation
from ._x3d import X3D

__all__ = ["ResNet3D", "SqueezeExcitation", "X3D", "kinetics400_classes"]
