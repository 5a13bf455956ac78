"""Model architectures. `build_model(arch)` rebuilds a model from the `arch` record that
every checkpoint carries, so prediction needs no architecture flags."""
from models.vnet import VNet


def build_model(arch: dict):
    """`arch`: {"name": "vnet", "in_channels", "out_channels", "num_layers", "dilation",
    "base_channels"}, as written by `model_arch`."""
    if arch.get("name") != "vnet":
        raise ValueError(f"unknown architecture {arch.get('name')!r}")
    kwargs = {k: arch[k] for k in ("in_channels", "out_channels", "num_layers", "dilation", "base_channels")}
    return VNet(**kwargs)


def model_arch(model: VNet) -> dict:
    return {"name": "vnet", **model.arch}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VNet", "build_model", "model_arch", "count_parameters"]
