"""The keyword spotter's pieces: batch-norm folding, save/load, continual model, detector."""

from __future__ import annotations

import pytest
import torch

from costream.audio import (
    Detector,
    fold_batch_norms,
    hops,
    load_spotter,
    save_spotter,
    spotter_network,
)
from costream.testing import assert_streaming_equivalent


def _trained_like(n_classes: int = 4, channels: int = 8) -> torch.nn.Sequential:
    """A spotter network with non-trivial batch-norm statistics (as after training)."""
    net = spotter_network(n_classes, channels=channels, dilations=(1, 2), window=12)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_fold_batch_norms_is_exact() -> None:
    net = _trained_like().double()
    folded = fold_batch_norms(net)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(2, 40, 30, dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-12, atol=1e-12)


def test_saved_spotter_streams_like_the_offline_network(tmp_path) -> None:
    net = _trained_like()
    path = tmp_path / "kws.pt"
    save_spotter(path, net, {"n_fft": 64, "hop_length": 16, "n_mels": 40, "sample_rate": 8000},
                 {"channels": 8, "dilations": [1, 2], "window": 12}, ["a", "b", "c", "_x_"],
                 [0, 1, 2], 0.7)
    spotter = load_spotter(path)
    assert spotter["threshold"] == 0.7 and spotter["keywords"] == [0, 1, 2]
    clip = hops(torch.randn(2, 16 * 40), 16)
    offline = net(spotter["front_end"](clip))  # the unfolded source network
    model = spotter["model"].double()
    reference = fold_batch_norms(net).double()  # folded in float32, as load_spotter does
    assert_streaming_equivalent(model, clip.double(),
                                lambda c: reference(spotter["front_end"](c)))
    stepped = model.forward_steps(clip.double()).float()
    torch.testing.assert_close(stepped, offline, rtol=1e-4, atol=1e-4)


def test_load_rejects_other_files(tmp_path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="not a keyword spotter"):
        load_spotter(tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="no such model"):
        load_spotter(tmp_path / "missing.pt")


def test_detector_rising_edges_and_refractory() -> None:
    det = Detector(keywords=[0, 1], threshold=0.5, refractory=2)
    seq = [[0.6, 0.1], [0.7, 0.6], [0.9, 0.0], [0.9, 0.0], [0.1, 0.0], [0.8, 0.0],
           [0.1, 0.7], [0.1, 0.1], [0.9, 0.0], [0.1, 0.1], [0.1, 0.8]]
    fired = [det.update(torch.tensor([*p, 0.0])) for p in seq]
    # class 0: hop 0; hops 1-3 stay above the threshold (no new edge); hops 5 and 8 are new
    # edges more than 2 hops after the previous detection. Class 1: hops 1, 6 and 10.
    # Class 2 is not a keyword.
    assert fired == [[0], [1], [], [], [], [0], [1], [], [0], [], [1]]
    det = Detector(keywords=[0], threshold=0.5, refractory=3)
    fired = [det.update(torch.tensor([p])) for p in (0.9, 0.1, 0.9, 0.1, 0.1, 0.9)]
    assert fired == [[0], [], [], [], [], [0]]  # the edge at hop 2 is within the refractory


def test_detector_smooths_posteriors_over_the_last_hops() -> None:
    det = Detector(keywords=[1], threshold=0.6, refractory=0, smooth=3)
    # scores: 0.9 (one hop: fires), 0.5, 0.4, 0.4 (the spike at hop 3 is averaged away),
    # 0.667 (fires), 0.9, 0.6, 0.3, 0.0
    probs = [0.9, 0.1, 0.2, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0]
    fired = [det.update([0.0, p]) for p in probs]
    assert [h for h, f in enumerate(fired) if f] == [0, 4]
    with pytest.raises(ValueError, match="smooth"):
        Detector([0], 0.5, 1, smooth=0)


@pytest.mark.parametrize("smooth,refractory", [(1, 0), (1, 7), (4, 3), (12, 25)])
def test_detector_scan_equals_stepping_hop_by_hop(smooth: int, refractory: int) -> None:
    g = torch.Generator().manual_seed(smooth * 100 + refractory)
    # bursts of high posteriors on a low background, as a stream of keywords gives
    probs = torch.rand(2000, 5, generator=g) ** 4
    probs[torch.rand(2000, generator=g) < 0.05, 2] = 0.97
    probs = torch.nn.functional.avg_pool1d(probs.T[None], 5, 1, 2)[0].T.mul(6).softmax(1)
    counts = []
    for threshold in (0.3, 0.5, 0.7):
        det = Detector([0, 2, 3], threshold, refractory, smooth=smooth)
        stepped = [(t, k) for t, row in enumerate(probs) for k in det.update(row)]
        counts.append(len(stepped))
        assert Detector([0, 2, 3], threshold, refractory, smooth=smooth).scan(probs) == stepped
    assert counts[0] > counts[-1] >= 0 and counts[0] > 10  # thresholds crossed, and they matter


def test_spotter_checkpoint_keeps_the_smoothing(tmp_path) -> None:
    save_spotter(tmp_path / "s.pt", spotter_network(3, channels=8), {}, {"channels": 8},
                 ["a", "b", "_unknown_"], [0, 1], 0.8, smooth=7)
    loaded = load_spotter(tmp_path / "s.pt")
    assert loaded["smooth"] == 7 and loaded["threshold"] == 0.8
