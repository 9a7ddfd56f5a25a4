"""Continual recurrent networks: :class:`RNN`, :class:`LSTM` and :class:`GRU`.

A unidirectional recurrent network already processes a stream causally; as a continual module its
state is the hidden state (and the LSTM cell state) of every layer, kept in the same state pytree
as every other continual module. A step runs the torch module's own computation on a one-frame
sequence, so the parameters, their names and the arithmetic are torch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import Age, CoModule
from ..core._temporal import Temporal
from ..core._tree import tree_where


class _CoRNNBase(CoModule):
    """Shared implementation of the continual :class:`RNN`, :class:`LSTM` and :class:`GRU`."""

    _torch_base: type[nn.RNNBase]
    _has_cell: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.bidirectional:
            raise self._bidirectional_error()

    @classmethod
    def _bidirectional_error(cls) -> ValueError:
        return ValueError(
            f"a continual {cls.__name__} cannot be bidirectional: the backward direction reads "
            f"the stream from its end, i.e. frames that have not arrived yet"
        )

    @classmethod
    def _config(cls, m: nn.RNNBase) -> dict[str, Any]:
        return {"input_size": m.input_size, "hidden_size": m.hidden_size,
                "num_layers": m.num_layers, "bias": m.bias, "batch_first": m.batch_first,
                "dropout": m.dropout}

    @classmethod
    def from_torch(cls, m: nn.RNNBase) -> _CoRNNBase:
        """A continual copy of ``m`` sharing its parameters (same names, same tensors)."""
        if m.bidirectional:
            raise cls._bidirectional_error()
        new = cls(**cls._config(m), device="meta")
        for name in m._flat_weights_names:
            setattr(new, name, getattr(m, name))
        new.train(m.training)
        return new

    # ------------------------------------------------------------------ geometry
    def _temporal(self) -> Temporal:
        return Temporal()

    def _input_spec(self) -> tuple[int | None, int | None]:
        return 2, self.input_size

    def _out_size(self) -> int:
        return getattr(self, "proj_size", 0) or self.hidden_size

    # ------------------------------------------------------------------ state and steps
    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        if tuple(shape) != (self.input_size,):
            raise ValueError(f"{type(self).__name__} expects frames (B, {self.input_size}), got "
                             f"frames of shape {tuple(shape)}")
        z = {"device": device, "dtype": dtype}
        state = {"h": torch.zeros(batch, self.num_layers, self._out_size(), **z)}
        if self._has_cell:
            state["c"] = torch.zeros(batch, self.num_layers, self.hidden_size, **z)
        return state, (self._out_size(),)

    def _hx(self, state: dict[str, Tensor]) -> Any:
        """The state in torch's layout ``(num_layers, B, H)``."""
        h = state["h"].transpose(0, 1).contiguous()
        if self._has_cell:
            return h, state["c"].transpose(0, 1).contiguous()
        return h

    def _state(self, hn: Any) -> dict[str, Tensor]:
        if self._has_cell:
            return {"h": hn[0].transpose(0, 1), "c": hn[1].transpose(0, 1)}
        return {"h": hn.transpose(0, 1)}

    def _check_stepping(self) -> None:
        if self.training and self.dropout > 0 and self.num_layers > 1:
            raise RuntimeError(f"stepping {type(self).__name__} with dropout in training mode; "
                               f"call .eval() first")

    def _run(self, seq: Tensor, hx: Any) -> tuple[Tensor, Any]:
        """torch's forward on ``seq`` ``(B, T, C)``: outputs ``(B, T, H)`` and final state."""
        if not self.batch_first:
            y, hn = self._torch_base.forward(self, seq.transpose(0, 1), hx)
            return y.transpose(0, 1), hn
        return self._torch_base.forward(self, seq, hx)

    def _step(self, x: Tensor, state: dict, age: Age, phase: int):
        self._check_stepping()
        if isinstance(age, int) and age < 0:
            return None, state, None, 0
        y, hn = self._run(x.unsqueeze(1), self._hx(state))
        new = self._state(hn)
        if isinstance(age, Tensor):  # streams not started yet keep their initial state
            new = tree_where(age >= 0, new, state)
        return y.squeeze(1), new, age, phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        self._check_stepping()
        skip = 0 if age is None else min(x.shape[2], max(0, -age))
        if skip == x.shape[2]:
            return None, state, None, 0
        y, hn = self._run(x[:, :, skip:].transpose(1, 2), self._hx(state))
        return (y.transpose(1, 2), self._state(hn), None if age is None else age + skip,
                phase + skip)

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{type(self).__name__}.forward expects a clip (B, C, T), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return self._run(x.transpose(1, 2), None)[0].transpose(1, 2)


_SHAPE_DOC = """
    Shape:
        clip ``(B, C, T)`` -> ``(B, H, T)``; frame ``(B, C)`` -> ``(B, H)``. State: ``h``
        ``(B, num_layers, H)``{cell} (batch first, unlike torch's ``(num_layers, B, H)``).

    Receptive field 1 and delay 0 in costream's sense, but every output depends on the whole
    history since the stream start (through the hidden state), not on a finite window.

    Stepping runs torch's own computation on one-frame sequences, so it equals the torch module
    fed one frame at a time with the hidden state carried over, bit for bit; ``forward_steps`` on a
    chunk is one call of the torch module on that chunk. Against the torch module run over a
    whole sequence at once, stepping agrees to rounding (not always bit for bit): torch's CPU
    kernel computes the input projection of the whole sequence in one matrix product, whose
    rounding depends on the number of rows.
"""


class RNN(_CoRNNBase, nn.RNN):
    __doc__ = """Continual Elman RNN (``tanh`` or ``relu``), all layers, unidirectional.

    Same constructor, parameters and ``forward`` semantics as :class:`torch.nn.RNN`;
    ``bidirectional=True`` raises ``ValueError``. ``batch_first`` only concerns the torch layout:
    costream clips are ``(B, C, T)``.
""" + _SHAPE_DOC.format(cell="") + """
    Example:
        >>> import torch, costream as cs
        >>> rnn = cs.RNN(3, 5, num_layers=2).double()
        >>> x = torch.randn(2, 3, 8, dtype=torch.double)
        >>> y = torch.stack([rnn.forward_step(x[:, :, t]) for t in range(8)], 2)
        >>> torch.allclose(y, rnn(x), rtol=0, atol=1e-14)
        True
    """

    _torch_base = nn.RNN

    @classmethod
    def _config(cls, m: nn.RNNBase) -> dict[str, Any]:
        return {**super()._config(m), "nonlinearity": m.nonlinearity}


class LSTM(_CoRNNBase, nn.LSTM):
    __doc__ = """Continual LSTM, all layers (``proj_size`` supported), unidirectional.

    Same constructor, parameters and ``forward`` semantics as :class:`torch.nn.LSTM`;
    ``bidirectional=True`` raises ``ValueError``.
""" + _SHAPE_DOC.format(cell=" and ``c`` ``(B, num_layers, hidden_size)``") + """
    Example:
        >>> import torch, costream as cs
        >>> lstm = cs.continual(torch.nn.LSTM(3, 5, batch_first=True)).double()
        >>> x = torch.randn(2, 3, 8, dtype=torch.double)
        >>> torch.equal(lstm.forward_steps(x), lstm(x))  # a chunk is one torch call
        True
    """

    _torch_base = nn.LSTM
    _has_cell = True

    @classmethod
    def _config(cls, m: nn.RNNBase) -> dict[str, Any]:
        return {**super()._config(m), "proj_size": m.proj_size}


class GRU(_CoRNNBase, nn.GRU):
    __doc__ = """Continual GRU, all layers, unidirectional.

    Same constructor, parameters and ``forward`` semantics as :class:`torch.nn.GRU`;
    ``bidirectional=True`` raises ``ValueError``.
""" + _SHAPE_DOC.format(cell="") + """
    Example:
        >>> import torch, costream as cs
        >>> gru = cs.GRU(3, 5).double()
        >>> state = gru.init_state(2)
        >>> y, state = gru.step(torch.randn(2, 3, dtype=torch.double), state)
        >>> y.shape, state["tree"]["h"].shape
        (torch.Size([2, 5]), torch.Size([2, 1, 5]))
    """

    _torch_base = nn.GRU
