"""Continual layers and containers."""

from ._attention import RetroactiveMultiheadAttention, SingleOutputMultiheadAttention
from ._branches import BroadcastReduce, Parallel, Residual
from ._conditional import Conditional
from ._conv import Conv1d, Conv2d, Conv3d
from ._delay import Delay, Skip
from ._frame import Broadcast, Lambda, Linear, Reduce, Reshape
from ._graph import Graph
from ._pointwise import is_pointwise, register_pointwise
from ._pool import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
)
from ._positional import RecyclingPositionalEncoding
from ._rnn import GRU, LSTM, RNN
from ._sequential import Sequential
from ._transformer import TransformerEncoder, TransformerEncoderLayer
from ._window import Pad, WindowReduce

__all__ = [
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "Broadcast",
    "BroadcastReduce", "Conditional", "Conv1d", "Conv2d", "Conv3d", "Delay", "GRU", "Graph",
    "LSTM", "Lambda", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "Pad", "Parallel", "RNN",
    "RecyclingPositionalEncoding", "Reduce", "Reshape", "Residual",
    "RetroactiveMultiheadAttention", "Sequential", "SingleOutputMultiheadAttention", "Skip",
    "TransformerEncoder", "TransformerEncoderLayer", "WindowReduce", "is_pointwise",
    "register_pointwise",
]
