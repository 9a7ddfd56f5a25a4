"""costream: continual inference for PyTorch.

Convert an offline temporal network into one that takes a single time step at a time, keeps
explicit state, and returns exactly what the offline network returns over a sliding window.

Example:
    >>> import torch, costream as cs
    >>> net = cs.continual(torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU()))
    >>> x = torch.randn(1, 2, 10)
    >>> torch.allclose(net.forward_steps(x), net(x))
    True
"""

from ._version import __version__
from .convert import NotStreamableError, continual, register_handler
from .core import CoModule, Temporal, call_mode
from .modules import (
    GRU,
    LSTM,
    RNN,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Broadcast,
    BroadcastReduce,
    Conditional,
    Conv1d,
    Conv2d,
    Conv3d,
    Delay,
    Graph,
    Lambda,
    Linear,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    Parallel,
    RecyclingPositionalEncoding,
    Reduce,
    Reshape,
    Residual,
    RetroactiveMultiheadAttention,
    Sequential,
    SingleOutputMultiheadAttention,
    Skip,
    TransformerEncoder,
    TransformerEncoderLayer,
    register_pointwise,
)

__all__ = [
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "Broadcast",
    "BroadcastReduce", "CoModule", "Conditional", "Conv1d", "Conv2d", "Conv3d", "Delay", "GRU",
    "Graph", "LSTM", "Lambda", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d",
    "NotStreamableError", "Parallel", "RNN", "RecyclingPositionalEncoding", "Reduce", "Reshape",
    "Residual", "RetroactiveMultiheadAttention", "Sequential", "SingleOutputMultiheadAttention",
    "Skip", "Temporal", "TransformerEncoder", "TransformerEncoderLayer", "__version__",
    "call_mode", "continual", "register_handler", "register_pointwise",
]
