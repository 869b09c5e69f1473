"""Bad input gets one clear error naming the argument, what came and what was expected."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from gyre import cells
from gyre.nn import GRU, LSTM, Recurrent


@pytest.fixture
def lstm():
    return LSTM(4, 5, num_layers=2)


def test_wrong_input_rank(lstm):
    with pytest.raises(ValueError, match=r"input: got a tensor of rank 4 .*expected \(T, B, I\)"):
        lstm(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"input: got a tensor of rank 1"):
        lstm(torch.randn(4))


def test_input_feature_size(lstm):
    with pytest.raises(ValueError, match=r"input: got feature size 7 .*expected input_size=4"):
        lstm(torch.randn(3, 2, 7))


def test_not_a_tensor(lstm):
    with pytest.raises(TypeError, match=r"input: got list"):
        lstm([[1.0, 2.0]])


def test_empty_sequence(lstm):
    with pytest.raises(ValueError, match=r"input: got a sequence of length 0"):
        lstm(torch.randn(0, 2, 4))


def test_hidden_state_shape(lstm):
    h = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"hx: state 'h' has shape \(2, 3, 5\), expected \(2, 2, 5\)"):
        lstm(torch.randn(3, 2, 4), (h, torch.zeros(2, 2, 5)))
    with pytest.raises(ValueError, match=r"hx: got a Tensor of shape .*expected a tuple of 2 Tensors"):
        lstm(torch.randn(3, 2, 4), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match=r"hx: got a tuple of 2 items, expected a Tensor"):
        GRU(4, 5)(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)))


@pytest.mark.parametrize("lengths,match", [
    ([3, 0], r"lengths: got 0, expected every length >= 1"),
    ([3, -1], r"lengths: got -1, expected every length >= 1"),
    ([3, 4], r"lengths: got 4, longer than the sequence \(3 steps\)"),
    ([3], r"lengths: got 1 lengths, expected one per sequence \(2\)"),
])
def test_bad_lengths_values(lstm, lengths, match):
    with pytest.raises(ValueError, match=match):
        lstm(torch.randn(3, 2, 4), lengths=lengths)


@pytest.mark.parametrize("lengths,match", [
    ([3, 2.5], r"lengths: got non-integer value 2.5, expected integers"),
    (torch.tensor([3.0, 2.0]), r"lengths: got a tensor of dtype torch.float32, expected integers"),
    (3, r"lengths: got int, expected a sequence of ints"),
])
def test_bad_lengths_types(lstm, lengths, match):
    with pytest.raises(TypeError, match=match):
        lstm(torch.randn(3, 2, 4), lengths=lengths)


def test_unsorted_lengths_with_enforce_sorted(lstm):
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"lengths: got \[2, 3\], expected decreasing order"):
        lstm(x, lengths=[2, 3], enforce_sorted=True)
    lstm(x, lengths=[2, 3])  # fine when not enforced


def test_lengths_with_packed_input(lstm):
    packed = pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(ValueError, match=r"lengths: got lengths with a PackedSequence"):
        lstm(packed, lengths=[3, 2])


def test_unknown_cell_lists_valid_ones():
    with pytest.raises(ValueError, match=r"cell: got 'lstmm', expected one of .*gru.*lstm.*peephole"):
        Recurrent("lstmm", 4, 5)
    with pytest.raises(TypeError, match=r"cell: got int"):
        cells.get(3)


def test_dtype_mismatch(lstm):
    with pytest.raises(TypeError, match=r"input: got dtype torch.float64, expected the layer's dtype "
                                        r"torch.float32"):
        lstm(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx \('c'\): got dtype torch.float64"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 5), torch.zeros(2, 2, 5, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"input: got dtype torch.int64, expected a floating dtype"):
        lstm(torch.zeros(3, 2, 4, dtype=torch.int64))


def test_device_mismatch(lstm):
    with pytest.raises(ValueError, match=r"input: got a tensor on meta, expected the layer's device cpu"):
        lstm(torch.empty(3, 2, 4, device="meta"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=0), r"hidden_size must be greater than zero, got 0"),
    (dict(num_layers=0), r"num_layers must be greater than zero, got 0"),
    (dict(dropout=1.5), r"dropout should be a number in range \[0, 1\] .*got 1.5"),
    (dict(recurrent_dropout=-0.1), r"recurrent_dropout: got -0.1"),
    (dict(zoneout=(0.1, 0.2, 0.3)), r"zoneout: got 3 rates, expected 1 or 2"),
    (dict(backend="cuda"), r"backend: got 'cuda', expected one of auto"),
    (dict(proj_size=5), r"proj_size: got 5, expected less than hidden_size=5"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(input_size=4, hidden_size=5) | kwargs
    with pytest.raises(ValueError, match=match):
        LSTM(**args)


def test_native_backend_refuses_what_torch_lacks():
    with pytest.raises(ValueError, match=r"backend: 'native' cannot run this configuration "
                                         r"\(torch has no fused kernel for lstm\(peephole\)\)"):
        LSTM(4, 5, peephole=True, backend="native")(torch.randn(3, 2, 4))


def test_step_refuses_bidirectional():
    with pytest.raises(ValueError, match=r"step: the layer is bidirectional"):
        LSTM(4, 5, bidirectional=True).step(torch.randn(2, 4))


def test_bad_cell_options():
    with pytest.raises(ValueError, match=r"nonlinearity: got 'garbage', expected one of"):
        cells.get("rnn", nonlinearity="garbage")
    with pytest.raises(ValueError, match=r"layer_norm: got True with reset_after=False"):
        GRU(4, 5, reset_after=False, layer_norm=True)
