"""Model architectures. `build_model(arch)` rebuilds a model from the `arch` record that
every checkpoint carries, so prediction needs no architecture flags."""
from models.iterative import IterativeFCN
from models.vnet import VNet

# Keys a record may lack because it was written before they existed; the defaults are what
# those checkpoints were trained with.
ARCH_DEFAULTS = {"attention_module": False, "reduction": 4, "attention_dilation": 4, "spatial_dims": 3,
                 "context_slices": 0}
ARCH_KEYS = ("in_channels", "out_channels", "num_layers", "dilation", "base_channels", *ARCH_DEFAULTS)


ITERATIVE = "iterative_fcn"  # the iterative strategy's network (models/iterative.py)


def build_model(arch: dict):
    """`arch`: {"name": "vnet", "in_channels", "out_channels", "num_layers", "dilation",
    "base_channels", "attention_module", "reduction", "attention_dilation", "spatial_dims",
    "context_slices"}, as written by `model_arch`; the last five may be missing (older
    checkpoints: no attention, 3D). Or {"name": "iterative_fcn", "in_channels",
    "base_channels", "levels"}."""
    if arch.get("name") == ITERATIVE:
        return IterativeFCN(**{k: v for k, v in arch.items() if k != "name"})
    if arch.get("name") != "vnet":
        raise ValueError(f"unknown architecture {arch.get('name')!r}")
    full = {**ARCH_DEFAULTS, **arch}
    return VNet(**{k: full[k] for k in ARCH_KEYS})


def model_arch(model) -> dict:
    return {"name": ITERATIVE if isinstance(model, IterativeFCN) else "vnet", **model.arch}


def describe(arch: dict) -> str:
    """One-line name of an architecture record, e.g. `V-Net`, `V-Net (num_layers=2)`,
    `V-Net (attention r=4 d=3)`, `iterative FCN (base_channels=4, levels=4)`; settings at
    their reference value are left out."""
    if arch.get("name") == ITERATIVE:
        return f"iterative FCN (base_channels={arch['base_channels']}, levels={arch['levels']})"
    full = {**ARCH_DEFAULTS, **arch}
    parts = []
    if full.get("num_layers", 1) != 1:
        parts.append(f"num_layers={full['num_layers']}")
    if full.get("dilation", 1) != 1:
        parts.append(f"dilation={full['dilation']}")
    if full.get("base_channels", 8) != 8:
        parts.append(f"base_channels={full['base_channels']}")
    if full["attention_module"]:
        parts.append(f"attention r={full['reduction']} d={full['attention_dilation']}")
    if full["context_slices"]:
        parts.append(f"{full['context_slices']} context slice(s) a side")
    name = "2D V-Net" if full["spatial_dims"] == 2 else "V-Net"
    return name + (f" ({', '.join(parts)})" if parts else "")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VNet", "IterativeFCN", "ITERATIVE", "build_model", "model_arch", "describe", "count_parameters"]
