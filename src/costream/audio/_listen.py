"""``costream listen``: stream a WAV file through a keyword spotter, printing detections live."""

from __future__ import annotations

import argparse
import time
import wave
from pathlib import Path

import numpy as np
import torch

_PCM = {1: np.uint8, 2: np.int16, 4: np.int32}


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file (standard ``wave`` module) as float32 mono in [-1, 1] and its rate.

    Example:
        >>> import os, tempfile, wave
        >>> from costream.audio import read_wav
        >>> p = os.path.join(tempfile.mkdtemp(), "x.wav")
        >>> with wave.open(p, "wb") as w:
        ...     w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
        ...     w.writeframes(b"\\x00\\x40" * 4)
        >>> read_wav(p)
        (array([0.5, 0.5, 0.5, 0.5], dtype=float32), 16000)
    """
    try:
        with wave.open(str(path)) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            data = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise SystemExit(f"no such WAV file: {path}") from None
    except (wave.Error, EOFError) as err:
        raise SystemExit(f"{path} is not a PCM WAV file ({err})") from None
    if width not in _PCM:
        raise SystemExit(f"{path}: {8 * width}-bit samples are not supported (8, 16 or 32 bit)")
    x = np.frombuffer(data, dtype=_PCM[width]).astype(np.float32)
    if width == 1:
        x = x - 128.0
    x = x / float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).mean(1), rate


def listen(model_path: str | Path, wav: str | Path, fast: bool = False,
           threshold: float | None = None, smooth: int | None = None,
           out=print) -> list[tuple[float, str, float]]:
    """Stream ``wav`` hop by hop through the spotter at ``model_path``; print detections.

    Returns the detections as ``(seconds, keyword, score)``, the time being the end of the
    hop at which the keyword was detected and the score its posterior averaged over the last
    ``smooth`` hops (see :class:`Detector`). ``threshold`` and ``smooth`` default to the ones
    saved with the model. Without ``fast`` it keeps real-time pace.

    Example:
        >>> import os, tempfile, wave
        >>> from costream.audio import listen, save_spotter, spotter_network
        >>> d = tempfile.mkdtemp()
        >>> save_spotter(f"{d}/kws.pt", spotter_network(3, channels=8), {}, {"channels": 8},
        ...              ["a", "b", "_unknown_"], [0, 1], 0.9)
        >>> with wave.open(f"{d}/quiet.wav", "wb") as w:
        ...     w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
        ...     w.writeframes(bytes(2 * 16000))
        >>> listen(f"{d}/kws.pt", f"{d}/quiet.wav", fast=True)
        0 detections in 1.0 s of audio (...)
        []
    """
    from ._spotter import Detector, load_spotter

    spotter = load_spotter(model_path)
    front, classes = spotter["front"], spotter["classes"]
    rate, hop = int(front.get("sample_rate", 16000)), int(front.get("hop_length", 160))
    audio, wav_rate = read_wav(wav)
    if wav_rate != rate:
        raise SystemExit(f"{wav} is sampled at {wav_rate} Hz; the model expects {rate} Hz")
    th = spotter["threshold"] if threshold is None else float(threshold)
    n = spotter["smooth"] if smooth is None else int(smooth)
    if n < 1:
        raise SystemExit(f"--smooth must be at least 1 hop, got {n}")
    det = Detector(spotter["keywords"], th, round(rate / hop), smooth=n)  # refractory: 1 s
    model = spotter["model"]
    wave_t = torch.from_numpy(np.ascontiguousarray(audio))
    found = []
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(len(audio) // hop):
            if not fast:
                time.sleep(max(0.0, start + t * hop / rate - time.perf_counter()))
            y = model.forward_step(wave_t[t * hop:(t + 1) * hop].view(1, hop))
            if y is None:
                continue
            for k in det.update(y[0].softmax(0)):
                sec = (t + 1) * hop / rate
                found.append((sec, classes[k], det.score[k]))
                out(f"{sec:8.2f} s  {classes[k]}  ({det.score[k]:.2f})")
    took = time.perf_counter() - start
    out(f"{len(found)} detections in {len(audio) / rate:.1f} s of audio ({took:.1f} s)")
    return found


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a keyword spotter saved by costream.audio.save_spotter "
                                 "(e.g. by examples/keyword_spotting.py)")
    p.add_argument("--wav", required=True, help="PCM WAV file at the model's sample rate")
    p.add_argument("--fast", action="store_true", help="as fast as possible (default: real time)")
    p.add_argument("--threshold", type=float, default=None,
                   help="detection threshold (default: the one saved with the model)")
    p.add_argument("--smooth", type=int, default=None,
                   help="hops the posteriors are averaged over before the threshold (default: "
                        "the number saved with the model)")


def run(args: argparse.Namespace) -> int:
    from .._cli_util import UsageError

    torch.set_num_threads(1)
    try:
        listen(args.model, args.wav, fast=args.fast, threshold=args.threshold,
               smooth=args.smooth, out=lambda m: print(m, flush=True))
    except SystemExit as err:  # the library's one-line refusals: a usage error (exit 2)
        if isinstance(err.code, str):
            raise UsageError(err.code) from None
        raise
    return 0
