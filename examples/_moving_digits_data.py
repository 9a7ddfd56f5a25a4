"""Moving digits: videos of scikit-learn's 8x8 digits moving across a small canvas.

The action in a segment is the digit *and* the direction it moves in (right, left, down, up), so
a single frame cannot tell the class: 10 digits x 4 directions = 40 classes. The digit moves one
pixel per frame on a 16x16 canvas that wraps around (a torus), starting at a random position,
with a random brightness and Gaussian pixel noise. A stream is a sequence of segments of random
length; at every segment change the digit, its direction and its position change at once.

Only scikit-learn's bundled ``load_digits`` (1797 images) is used: nothing is downloaded.
Training and evaluation use disjoint images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per frame
DIRECTION_NAMES = ("right", "left", "down", "up")
NUM_CLASSES = 10 * len(DIRECTIONS)
CANVAS = 16


def class_of(digit: int, direction: int) -> int:
    """The action class of ``digit`` moving in ``DIRECTIONS[direction]``."""
    return digit * len(DIRECTIONS) + direction


def describe_class(label: int) -> str:
    """``"7 left"`` for the class of digit 7 moving left."""
    return f"{label // len(DIRECTIONS)} {DIRECTION_NAMES[label % len(DIRECTIONS)]}"


@dataclass
class DigitImages:
    """Digit images in [0, 1] ``(N, 8, 8)`` and their digits ``(N,)``."""

    images: np.ndarray
    digits: np.ndarray


def load_split(seed: int = 0, test_fraction: float = 0.4) -> tuple[DigitImages, DigitImages]:
    """scikit-learn's digits split by image into a training and a test set (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    tr_x, te_x, tr_y, te_y = train_test_split(images, digits.target, test_size=test_fraction,
                                              random_state=seed, stratify=digits.target)
    return DigitImages(tr_x, tr_y), DigitImages(te_x, te_y)


def render(image: np.ndarray, direction: int, frames: int, rng: np.random.Generator,
           noise: float = 0.15) -> np.ndarray:
    """``frames`` frames ``(T, CANVAS, CANVAS)`` of ``image`` moving one pixel per frame."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    canvas[:8, :8] = image * rng.uniform(0.6, 1.0)
    y0, x0 = rng.integers(0, CANVAS, size=2)
    dy, dx = DIRECTIONS[direction]
    out = np.stack([np.roll(canvas, (y0 + dy * t, x0 + dx * t), axis=(0, 1))
                    for t in range(frames)])
    out += rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    return out


def clip_batch(data: DigitImages, batch: int, frames: int,
               rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` single-segment clips ``(B, 1, frames, 16, 16)`` and their classes ``(B,)``."""
    idx = rng.integers(0, len(data.images), size=batch)
    directions = rng.integers(0, len(DIRECTIONS), size=batch)
    clips = np.stack([render(data.images[i], int(d), frames, rng)
                      for i, d in zip(idx, directions)])
    labels = [class_of(int(data.digits[i]), int(d)) for i, d in zip(idx, directions)]
    return torch.from_numpy(clips).unsqueeze(1), torch.tensor(labels)


@dataclass
class Stream:
    """A long video ``(1, 1, T, 16, 16)``, the class of every frame and the segment starts."""

    video: Tensor
    labels: Tensor
    changes: list[int]


def make_stream(data: DigitImages, frames: int, rng: np.random.Generator,
                segment: tuple[int, int] = (30, 80)) -> Stream:
    """A stream of ``frames`` frames made of segments of ``segment[0]..segment[1]`` frames.

    Consecutive segments always differ in class.
    """
    chunks, labels, changes = [], [], []
    t, previous = 0, -1
    while t < frames:
        length = min(int(rng.integers(segment[0], segment[1] + 1)), frames - t)
        while True:
            i = int(rng.integers(0, len(data.images)))
            d = int(rng.integers(0, len(DIRECTIONS)))
            label = class_of(int(data.digits[i]), d)
            if label != previous:
                break
        chunks.append(render(data.images[i], d, length, rng))
        labels += [label] * length
        changes.append(t)
        t += length
        previous = label
    video = torch.from_numpy(np.concatenate(chunks)).unsqueeze(0).unsqueeze(0)
    return Stream(video, torch.tensor(labels), changes)
