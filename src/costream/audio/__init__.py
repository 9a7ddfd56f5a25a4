"""Continual audio front-ends: raw samples in, one hop per step; spectrogram frames out.

:class:`STFT`, :class:`MelScale`, :class:`ToDB` and :class:`DCT` are continual modules, so a
front-end and a network after it form one continual network (see ``docs/audio.md``).

Example:
    >>> import torch, costream as cs
    >>> from costream.audio import hops, mel_spectrogram
    >>> net = cs.Sequential(*mel_spectrogram(16000, 400, 160, n_mels=40),
    ...                     cs.Conv1d(40, 8, 3))
    >>> clip = hops(torch.randn(1, 8000), 160)        # 50 hops of 10 ms
    >>> torch.allclose(net.forward_steps(clip, pad_end=True), net(clip), atol=1e-3)
    True
"""

from ._db import ToDB
from ._dct import DCT, dct_matrix
from ._features import mel_spectrogram, mfcc
from ._listen import listen, read_wav
from ._mel import MelScale, hz_to_mel, mel_filters, mel_to_hz
from ._spotter import (
    Detector,
    fold_batch_norms,
    load_spotter,
    save_spotter,
    spotter_front_end,
    spotter_network,
)
from ._stft import STFT, hops, waveform_of

__all__ = ["DCT", "Detector", "MelScale", "STFT", "ToDB", "dct_matrix", "fold_batch_norms",
           "hops", "hz_to_mel", "listen", "load_spotter", "mel_filters", "mel_spectrogram",
           "mel_to_hz", "mfcc", "read_wav", "save_spotter", "spotter_front_end",
           "spotter_network", "waveform_of"]
