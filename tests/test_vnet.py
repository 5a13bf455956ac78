import math

import pytest
import torch

from models import VNet, build_model, count_parameters, describe, model_arch
from models.attention import BottleneckAttention3d
from test_attention import bam_parameters

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


def test_attention_vnet_runs_forward_and_backward_on_non_cubic_input():
    torch.manual_seed(0)
    model = VNet(base_channels=4, attention_module=True, reduction=4, attention_dilation=3)
    x = torch.randn(1, 1, 32, 48, 64)
    y = model(x)
    assert y.shape == (1, 1, 32, 48, 64)
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(isinstance(m, BottleneckAttention3d) for m in model.modules()) == 5


@pytest.mark.parametrize("num_layers", [1, 2])
def test_attention_adds_one_hand_counted_module_per_encoder_width(num_layers):
    plain = count_parameters(VNet(num_layers=num_layers))
    gated = count_parameters(VNet(num_layers=num_layers, attention_module=True, attention_dilation=3))
    assert gated - plain == sum(bam_parameters(c, 4) for c in (8, 16, 32, 64, 128)) == 90_587
    assert gated == {1: 10_849_652, 2: 16_290_612}[num_layers]  # the docstring's figures


def test_without_attention_the_weights_and_their_initialisation_are_unchanged():
    torch.manual_seed(0)
    plain = VNet(base_channels=2)
    torch.manual_seed(0)
    gated = VNet(base_channels=2, attention_module=True)
    plain_state, gated_state = plain.state_dict(), gated.state_dict()
    assert not any("gate" in k for k in plain_state)
    for k, v in plain_state.items():
        assert torch.equal(v, gated_state[k]), k


def test_build_model_round_trips_the_attention_variant():
    model = VNet(base_channels=4, attention_module=True, reduction=2, attention_dilation=3)
    rebuilt = build_model(model_arch(model))
    assert model_arch(rebuilt) == model_arch(model)
    rebuilt.load_state_dict(model.state_dict())


def test_build_model_reads_records_written_before_attention_existed():
    model = VNet(base_channels=2, dilation=2)
    newer = ("attention_module", "reduction", "attention_dilation")
    old = {k: v for k, v in model_arch(model).items() if k not in newer}
    rebuilt = build_model(old)
    assert model_arch(rebuilt) == model_arch(model) and not rebuilt.arch["attention_module"]
    rebuilt.load_state_dict(model.state_dict())


def test_describe_names_the_variant():
    assert describe(model_arch(VNet(base_channels=2))) == "V-Net (base_channels=2)"
    assert describe({"name": "vnet", "num_layers": 1, "dilation": 1, "base_channels": 8}) == "V-Net"
    assert describe(model_arch(VNet(num_layers=2, base_channels=8))) == "V-Net (num_layers=2)"
    gated = VNet(base_channels=8, attention_module=True, attention_dilation=3)
    assert describe(model_arch(gated)) == "V-Net (attention r=4 d=3)"


def _conv_output_stds(model, x):
    """Standard deviation of every convolution's output in one forward pass, keyed by module."""
    stds = {}
    def record(module, inputs, output):
        stds.setdefault(module, output.std().item())

    hooks = [m.register_forward_hook(record)
             for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stds


@pytest.mark.parametrize("attention", [False, True])
def test_unit_variance_init_gives_every_vnet_convolution_unit_std_on_its_batch(attention):
    torch.manual_seed(0)
    model = VNet(base_channels=2, num_layers=2, attention_module=attention)
    # a smooth, offset, badly scaled input: nothing about it is unit-variance to begin with
    x = 40 + 25 * torch.nn.functional.avg_pool3d(torch.randn(2, 1, 20, 36, 52), 5, stride=1)
    before = _conv_output_stds(model, x)
    logit_weights = model.output.weight.clone()
    gate_weights = [p.clone() for n, p in model.named_parameters() if n.startswith("gate")]
    factors = model.unit_variance_init(x)
    after = _conv_output_stds(model, x)
    own = [m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
           and not n.startswith(("gate", "output"))]
    assert len(factors) == len(own) == 1 + 2 * (2 * (1 + 2) + 2 * (1 + 3))
    # (input stage; then in the encoder and again in the decoder: two stages of a resampling
    # convolution + 2 convolutions and two of one + 3, at num_layers=2)
    assert all(abs(after[m] - 1) < 1e-4 for m in own)
    assert any(abs(before[m] - 1) > 0.3 for m in own)  # the default start is far from it
    assert torch.equal(model.output.weight, logit_weights)
    with torch.no_grad():
        logits = model(x)
    assert abs(logits.mean().item() - math.log(0.01 / 0.99)) < 1e-4
    assert torch.sigmoid(logits).mean() < 0.05  # starts out predicting background
    after = (p for n, p in model.named_parameters() if n.startswith("gate"))
    assert all(torch.equal(a, b) for a, b in zip(gate_weights, after))


def test_unit_variance_init_refuses_a_prior_outside_zero_one():
    with pytest.raises(ValueError, match="prior"):
        VNet(base_channels=2).unit_variance_init(torch.randn(1, 1, 16, 16, 16), prior=1.0)


def test_load_matching_copies_the_shared_tensors_and_leaves_the_rest():
    torch.manual_seed(0)
    plain = VNet(base_channels=2)
    deeper = VNet(base_channels=2, num_layers=2, attention_module=True)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    # every tensor of the plain V-Net has a namesake of its shape in the deeper one: the extra
    # convolutions follow the plain ones in each stack, and the gates are new modules
    assert deeper.load_matching(plain.state_dict()) == len(plain.state_dict())
    after = deeper.state_dict()
    for k, v in after.items():
        if k in plain.state_dict():
            assert torch.equal(v, plain.state_dict()[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert any(k.startswith("gate") for k in after) and "down1.convs.2.weight" in after
    # another width shares only what has no channel dimension (the one-channel logit bias)
    assert VNet(base_channels=4).load_matching(plain.state_dict()) == 1
