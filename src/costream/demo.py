"""A short demonstration: convert a temporal network, stream it, and check it is exact.

Run it with ``costream demo`` (or ``python -m costream.demo``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .convert import continual


def build_tcn(channels: int = 64, layers: int = 6) -> nn.Sequential:
    """A small temporal convolutional network with dilated, padded and strided-free convs."""
    mods: list[nn.Module] = [nn.Conv1d(8, channels, 3, padding=1), nn.ReLU()]
    for i in range(layers - 2):
        d = 2 ** (i % 3)
        mods += [nn.Conv1d(channels, channels, 3, padding=d, dilation=d),
                 nn.BatchNorm1d(channels), nn.ReLU()]
    mods += [nn.Conv1d(channels, 4, 3, padding=1)]
    return nn.Sequential(*mods).eval()


def _median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def run_demo(frames: int = 64, seed: int = 0) -> dict[str, float]:
    """Convert :func:`build_tcn`, step it over ``frames`` frames and compare with offline.

    Returns the measured numbers (also printed): max |difference| between stepping and the
    offline network on the same stream, and the median per-step latency of stepping vs
    recomputing the window.
    """
    torch.manual_seed(seed)
    model = build_tcn()
    net = continual(model)
    x = torch.randn(1, 8, frames)
    with torch.inference_mode():
        offline = model(x)
        stepped = [net.forward_step(x[:, :, t]) for t in range(frames)]
        net.reset_state()
        due = torch.stack([y for y in stepped if y is not None], dim=2)
        diff = (due - offline[:, :, : due.shape[2]]).abs().max().item()
        window = x[:, :, -net.receptive_field:]
        t_window = _median_us(lambda: model(window), 50)
        for t in range(frames):
            net.forward_step(x[:, :, t])
        t_step = _median_us(lambda: net.forward_step(x[:, :, -1]), 200)
        net.reset_state()
    print(f"network: {len(model)} modules, receptive field {net.receptive_field} frames, "
          f"delay {net.delay} steps")
    print(f"streamed {frames} frames: {due.shape[2]} outputs due, "
          f"max |step - offline| = {diff:.2e}")
    print(f"per prediction: step {t_step:.0f} us vs recomputing the {net.receptive_field}-frame "
          f"window {t_window:.0f} us ({t_window / t_step:.1f}x)")
    return {"max_abs_diff": diff, "step_us": t_step, "window_us": t_window}


if __name__ == "__main__":
    run_demo()
