"""Measuring tools for benchmarks: MAC counts, and the ``costream bench`` harness.

MAC counters for offline and continual networks, and :func:`run_bench`, which measures cost,
latency, state memory and exactness of continual models against their offline computation
(the library side of ``costream bench``; plots with :func:`plot_bench` need matplotlib).

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
from ._plot import plot_bench
from ._ptflops import PtflopsCounter, ptflops_macs, ptflops_step_macs
from ._report import format_table, to_csv, to_json, to_markdown
from ._run import run_bench, state_bytes
from ._workloads import Workload, load_converted, resolve_workload

__all__ = [
    "PtflopsCounter", "Workload", "count_macs", "format_table", "load_converted", "plot_bench",
    "ptflops_macs", "ptflops_step_macs", "resolve_workload", "run_bench", "state_bytes",
    "step_macs", "theoretical_step_macs", "to_csv", "to_json", "to_markdown",
]
