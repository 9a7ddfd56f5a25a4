"""A front-end + network exports to ONNX as one step and streams the same in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import costream as cs
from costream.audio import hops, mel_spectrogram

pytest.importorskip("onnxruntime")


def test_centred_log_mel_network_exports(tmp_path) -> None:
    from costream.export import OnnxStreamRunner, export_onnx

    # center=True: the exported step includes the reflect-index table picked by the counter
    tail = torch.nn.Sequential(torch.nn.Conv1d(8, 4, 3, dilation=2), torch.nn.ReLU())
    net = cs.Sequential(*mel_spectrogram(8000, 64, 16, n_mels=8, f_max=3000.0),
                        *cs.continual(tail)).eval()
    path = tmp_path / "front.onnx"
    manifest = export_onnx(net, path, frame_shape=(16,), optimize=False)
    assert manifest["delay"] == net.delay
    clip = hops(torch.randn(1, 16 * 30) * 0.1, 16)
    got = np.asarray(OnnxStreamRunner(path, threads=1).run(clip.numpy()))
    with torch.inference_mode():
        ref = net.forward_steps(clip)[0].T.numpy()  # (T_out, channels)
    assert got.shape[0] == ref.shape[0] == 30 - net.delay
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)
