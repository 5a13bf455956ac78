import pytest
import torch

from models import VNet, build_model, count_parameters, model_arch

REFERENCE = {1: 10_759_306, 2: 16_200_266}  # the reference write-up's table (10.75 M, 16.2 M)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_parameter_count_matches_reference_within_one_percent(num_layers):
    n = count_parameters(VNet(num_layers=num_layers))
    assert abs(n - REFERENCE[num_layers]) / REFERENCE[num_layers] < 0.01
    # The reference counts 241 parameters it never uses (see the VNet docstring).
    assert REFERENCE[num_layers] - n == 241


def test_forward_returns_logits_of_input_shape_on_non_cubic_input():
    model = VNet(base_channels=2)
    x = torch.randn(2, 1, 16, 32, 48)
    y = model(x)
    assert y.shape == (2, 1, 16, 32, 48)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dilation_keeps_shape():
    assert VNet(base_channels=2, dilation=2)(torch.randn(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_input_not_divisible_by_16_is_refused():
    with pytest.raises(AssertionError, match="divide by 16"):
        VNet(base_channels=2)(torch.randn(1, 1, 16, 16, 24))


def test_build_model_round_trips_the_architecture_record():
    model = VNet(num_layers=2, dilation=3, base_channels=2)
    rebuilt = build_model(model_arch(model))
    assert model_arch(rebuilt) == model_arch(model)
    rebuilt.load_state_dict(model.state_dict())


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="num_layers"):
        VNet(num_layers=0)
