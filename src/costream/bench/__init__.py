"""Measuring tools for benchmarks: MAC counts of offline and continual networks.

Not imported by ``import costream``; import ``costream.bench`` explicitly.

Example:
    >>> import torch, costream
    >>> from costream.bench import step_macs, theoretical_step_macs
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1))
    >>> step_macs(costream.continual(net), torch.randn(1, 4))
    96
    >>> theoretical_step_macs(net, torch.randn(1, 4, 10))
    96
"""

from ._macs import count_macs, step_macs, theoretical_step_macs

__all__ = ["count_macs", "step_macs", "theoretical_step_macs"]
