import pytest
import torch

from models import count_parameters
from models.attention import BottleneckAttention3d


def bam_parameters(c: int, r: int) -> int:
    """Counted by hand from the module's description, hidden width h = max(1, c // r)."""
    h = max(1, c // r)
    channel = (c * h + h) + (h * c + c)                   # Linear c->h, Linear h->c
    spatial = (c * h + h) + 2 * (27 * h * h + h) + (h + 1)  # 1x1x1, two 3x3x3, 1x1x1 to one map
    return channel + spatial


@pytest.mark.parametrize("channels, reduction", [(8, 4), (16, 4), (128, 4), (32, 8), (2, 4)])
def test_parameter_count_matches_a_hand_count(channels, reduction):
    assert count_parameters(BottleneckAttention3d(channels, reduction, 3)) == bam_parameters(channels, reduction)


def test_hand_count_of_the_reference_widths():
    assert [bam_parameters(c, 4) for c in (8, 16, 32, 64, 128)] == [283, 1093, 4297, 17041, 67873]


def test_keeps_the_shape_of_any_input_size():
    module = BottleneckAttention3d(8, reduction=4, dilation=4)
    x = torch.randn(2, 8, 3, 5, 7)
    assert module(x).shape == x.shape


def test_output_lies_between_once_and_twice_the_input():
    torch.manual_seed(0)
    module = BottleneckAttention3d(4, reduction=2, dilation=2)
    x = torch.rand(1, 4, 6, 5, 4) + 0.1
    ratio = module(x) / x
    assert (ratio > 1).all() and (ratio < 2).all()


def test_gates_are_summed_inside_one_sigmoid():
    module = BottleneckAttention3d(4, reduction=2, dilation=1)
    with torch.no_grad():
        for last in (module.channel.mlp[-1], module.spatial.body[-1]):
            last.weight.zero_()
        module.channel.mlp[-1].bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        module.spatial.body[-1].bias.fill_(-0.5)
    x = torch.ones(1, 4, 2, 3, 4)
    expected = 1 + torch.sigmoid(torch.tensor([0.0, -1.5, 1.5, -0.5]))  # channel + spatial
    assert torch.allclose(module(x), expected.view(1, 4, 1, 1, 1).expand_as(x))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="reduction"):
        BottleneckAttention3d(8, reduction=0)
