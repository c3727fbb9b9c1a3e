"""patch(model, config): fused adapters in a frozen Hugging Face BERT-family model.

A BERT-family layer ends each sub-layer with a "residual tail" module (BertSelfOutput after
attention, BertOutput after the feed-forward block):

    forward(hidden_states, input_tensor) = LayerNorm(dropout(dense(hidden_states)) + input_tensor)

patch() finds those tails by structure (a ``dense`` Linear, a ``dropout`` and an affine
``LayerNorm``, inside layers held in an nn.ModuleList), gives each selected one a
``BottleneckAdapter`` child named ``ampfuse_adapter`` and swaps its class for a subclass whose
forward runs ``dense -> dropout -> fused adapter block``. Parameter names of the base model do
not change, so its state dict still loads; unpatch() swaps the classes back.
"""

import json
import os
import re

import torch
from torch import nn

from .config import AdapterConfig
from .modules.bottleneck import BottleneckAdapter

ADAPTER = "ampfuse_adapter"
SITES = ("attention", "output")  # mh_adapter site, output_adapter site
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def _fused_forward(self, hidden_states, input_tensor):
    return getattr(self, ADAPTER)(self.dropout(self.dense(hidden_states)), input_tensor, self.LayerNorm)


_FUSED_CLASSES = {}


def _fused_class(cls):
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"AmpFused{cls.__name__}", (cls,), {"forward": _fused_forward,
                                                                        "_ampfuse_base": cls})
    return _FUSED_CLASSES[cls]


def _is_residual_tail(module) -> bool:
    norm = getattr(module, "LayerNorm", None)
    return (isinstance(getattr(module, "dense", None), nn.Linear) and isinstance(norm, nn.LayerNorm)
            and isinstance(getattr(module, "dropout", None), nn.Dropout) and norm.weight is not None
            and norm.bias is not None and len(norm.normalized_shape) == 1)


def _sites(layer):
    """{"attention": self-output tail, "output": feed-forward tail} of one layer, or None."""
    attention = getattr(getattr(layer, "attention", None), "output", None)
    output = getattr(layer, "output", None)
    if attention is not None and output is not None and _is_residual_tail(attention) and _is_residual_tail(output):
        return {"attention": attention, "output": output}
    return None


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList of the model's transformer layers (each with two residual tails)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_sites(layer) for layer in module):
            return module
    raise ValueError(f"{type(model).__name__} has no BERT-style layers: expected an nn.ModuleList of layers whose "
                     "attention.output and output each have dense (Linear), dropout and LayerNorm")


def find_layers(model: nn.Module):
    """The model's transformer layers, bottom to top, as [(index, {site: tail module})]."""
    return [(i, _sites(layer)) for i, layer in enumerate(transformer_layers(model))]


def adapters(model: nn.Module):
    """{(layer, site): BottleneckAdapter} of a patched model."""
    return {(i, site): getattr(tail, ADAPTER) for i, sites in find_layers(model) for site, tail in sites.items()
            if hasattr(tail, ADAPTER)}


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_ampfuse_config")


def select_layers(indices, num_layers: int, what: str):
    """Sorted distinct layer indices (negative ones count from the top); None means all layers."""
    if indices is None:
        return list(range(num_layers))
    selected = set()
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{what} has {i}, but the model has {num_layers} layers")
        selected.add(i % num_layers)
    return sorted(selected)


def patch(model: nn.Module, config: AdapterConfig = None) -> nn.Module:
    """Freezes every parameter of ``model`` and inserts fused adapters where ``config`` says.

    Returns the model (patched in place). Layers below the lowest adapted one hold no trainable
    parameter, so a training forward builds no autograd graph there and keeps none of their
    activations.
    """
    config = config or AdapterConfig()
    layers = find_layers(model)
    selected = select_layers(config.layers, len(layers), "AdapterConfig.layers")
    freeze(model, config)
    wanted = [site for site, on in zip(SITES, (config.mh_adapter, config.output_adapter)) if on]
    for index in selected:
        for site in wanted:
            tail = layers[index][1][site]
            hidden = tail.LayerNorm.normalized_shape[0]
            adapter = BottleneckAdapter(
                hidden, config.bottleneck_for(index, hidden), activation=config.non_linearity,
                ln_before=config.ln_before, original_ln_before=config.original_ln_before,
                residual_before_ln=config.residual_before_ln, scaling=config.scaling, dropout=config.dropout,
                init=config.init_weights, init_std=1e-2, zero_init_up=config.zero_init_up,
                device=tail.dense.weight.device, dtype=tail.dense.weight.dtype)
            attach(tail, adapter)
    return model


def freeze(model: nn.Module, config) -> None:
    """Marks ``model`` as patched with ``config``: every parameter frozen but those of
    config.trainable_modules; the original requires_grad flags are kept for unpatch."""
    if is_patched(model):
        raise ValueError("model is already patched by ampfuse; call ampfuse.unpatch(model) first")
    model._ampfuse_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(_in_modules(name, config.trainable_modules))
    model._ampfuse_config = config


def attach(tail: nn.Module, adapter: nn.Module) -> None:
    """Makes the residual tail run ``adapter(dropout(dense(x)), input_tensor, LayerNorm)``."""
    tail.add_module(ADAPTER, adapter)
    if not hasattr(tail, "_ampfuse_base"):
        tail.__class__ = _fused_class(type(tail))


def _in_modules(name, modules):
    return any(f".{name}".find(f".{m}.") >= 0 for m in modules)


def unpatch(model: nn.Module) -> nn.Module:
    """Removes the fused adapters and restores the original modules and requires_grad flags."""
    if not is_patched(model):
        raise ValueError("model is not patched by ampfuse")
    for _, sites in find_layers(model):
        for tail in sites.values():
            if hasattr(tail, ADAPTER):
                delattr(tail, ADAPTER)
                tail.__class__ = tail._ampfuse_base
    for name, p in model.named_parameters():
        p.requires_grad_(model._ampfuse_requires_grad.get(name, p.requires_grad))
    del model._ampfuse_config, model._ampfuse_requires_grad
    return model


def trainable_parameters(model: nn.Module):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


# ----------------------------------------------------------------------------- save / load

def adapter_state_dict(model: nn.Module):
    """The adapters' tensors and those of config.trainable_modules, keyed as in model.state_dict()."""
    modules = [ADAPTER, *model._ampfuse_config.trainable_modules]
    return {name: t for name, t in model.state_dict().items() if _in_modules(name, modules)}


def _shape_info(model):
    layers = find_layers(model)
    return {"num_layers": len(layers), "hidden_size": layers[0][1]["output"].LayerNorm.normalized_shape[0]}


def save_adapters(model: nn.Module, directory: str) -> None:
    """Writes the adapter weights (safetensors) and the config plus model shape (JSON) to ``directory``."""
    from safetensors.torch import save_file

    if not is_patched(model):
        raise ValueError("model is not patched by ampfuse: there are no adapters to save")
    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    meta = {"format": "ampfuse", "config": model._ampfuse_config.to_dict(), **_shape_info(model)}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Loads adapters saved by save_adapters, patching ``model`` first if it is not patched."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("format") != "ampfuse":
        raise ValueError(f"{directory} does not hold ampfuse adapters (for adapters-library ones use "
                         "ampfuse.load_adapterhub)")
    shape = _shape_info(model)
    saved = {k: meta[k] for k in shape}
    if saved != shape:
        raise ValueError(f"adapters in {directory} were saved for a model with {saved}, this model has {shape}")
    config = AdapterConfig.from_dict(meta["config"])
    if not is_patched(model):
        patch(model, config)
    _copy_into_adapters(model, load_file(os.path.join(directory, WEIGHTS_NAME)), str(directory))
    return model


def _copy_into_adapters(model, tensors, source):
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter weights from {source} do not match this model's adapters: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    with torch.no_grad():
        for name, target in own.items():
            if tensors[name].shape != target.shape:
                raise ValueError(f"{name}: {source} has shape {tuple(tensors[name].shape)}, "
                                 f"this model's adapter has {tuple(target.shape)}")
            target.copy_(tensors[name])


# ----------------------------------------------------------------------------- adapters-library interop

_HUB_KEY = re.compile(r"(?:^|\.)layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\.(.+)$")


def load_adapterhub(model: nn.Module, directory: str) -> nn.Module:
    """Loads a bottleneck adapter that the ``adapters`` library saved (``model.save_adapter(dir, name)``:
    SeqBn / DoubleSeqBn and their options the fused op supports) into ``model``, patching it."""
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    if "config" not in meta or meta.get("format") == "ampfuse":
        raise ValueError(f"{directory}/{CONFIG_NAME} is not an adapters-library adapter config")
    hub_config = meta["config"]
    if hub_config.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise ValueError(f"only bottleneck adapters can be loaded, got architecture {hub_config['architecture']!r}")
    shape = _shape_info(model)
    if meta.get("hidden_size", shape["hidden_size"]) != shape["hidden_size"]:
        raise ValueError(f"the adapter in {directory} is for hidden size {meta['hidden_size']}, this model has "
                         f"{shape['hidden_size']}")
    config = AdapterConfig.from_adapterhub(hub_config, num_layers=shape["num_layers"])
    if is_patched(model):
        raise ValueError("model is already patched; load_adapterhub patches it with the adapter's own config")
    patch(model, config)
    _copy_into_adapters(model, _hub_to_ampfuse(model, _load_hub_weights(directory), config.ln_before),
                        str(directory))
    return model


def _load_hub_weights(directory):
    for name in ("pytorch_adapter.safetensors", "adapter.safetensors"):
        if os.path.exists(os.path.join(directory, name)):
            from safetensors.torch import load_file
            return load_file(os.path.join(directory, name))
    path = os.path.join(directory, "pytorch_adapter.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter weights (pytorch_adapter.bin or .safetensors) in {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _hub_to_ampfuse(model, hub, ln_before):
    """Renames adapters-library keys to this model's adapter keys."""
    site_names = {"attention.output": "attention", "output": "output"}
    linear = "adapter_down.1" if ln_before else "adapter_down.0"
    renames = {f"{linear}.weight": "down.weight", f"{linear}.bias": "down.bias", "adapter_up.weight": "up.weight",
               "adapter_up.bias": "up.bias", "scaling": "scaling",
               "adapter_norm_before.weight": "adapter_norm.weight", "adapter_norm_before.bias": "adapter_norm.bias"}
    names = {id(module): name for name, module in model.named_modules()}
    prefix = {(i, site): names[id(tail)] for i, sites in find_layers(model) for site, tail in sites.items()}
    out = {}
    for key, value in hub.items():
        match = _HUB_KEY.search(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in adapters-library weights")
        layer, site, _, rest = match.groups()
        if ln_before and rest.startswith("adapter_down.0."):
            continue  # the same LayerNorm as adapter_norm_before
        if rest not in renames:
            raise ValueError(f"adapters-library weight {key!r} has no counterpart in the fused adapter")
        out[f"{prefix[(int(layer), site_names[site])]}.{ADAPTER}.{renames[rest]}"] = value
    return out

