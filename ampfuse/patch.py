"""patch(model, config): fused adapters in a frozen Hugging Face BERT-family model.

patch() finds the model's layers and their residual sites (ampfuse.sites: ``LayerNorm(h + r)`` at
the end of the attention and feed-forward sub-layers of BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
DeBERTa-v2, DistilBERT and ALBERT), freezes every parameter, and attaches a ``BottleneckAdapter``
at each selected site, which runs the fused adapter block in place of that LayerNorm. unpatch()
restores the original modules bitwise. The same freeze / attach / save / load helpers serve
ampfuse.models.
"""

import functools
import json
import os
import re

import torch
from torch import nn

from . import sites
from .config import AdapterConfig
from .modules import shared
from .modules.bottleneck import BottleneckAdapter
from .sites import ADAPTER, SITES

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def adapters(model: nn.Module):
    """{(layer, site): BottleneckAdapter} of a patched model."""
    return sites.adapters(sites.find(model))


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


def patch(model: nn.Module, config: AdapterConfig = None, *, dtype: torch.dtype = None) -> nn.Module:
    """Freezes every parameter of ``model`` and inserts fused adapters where ``config`` says.

    Returns the model (patched in place). The adapters take the device of the weights at their
    site and their dtype, or ``dtype`` (e.g. float32 master weights on a bfloat16 base). Layers
    below the lowest adapted one hold no trainable parameter, so a training forward builds no
    autograd graph there and keeps none of their activations.
    """
    config = config or AdapterConfig()
    layers = sites.find(model)
    selected = select_layers(config.layers, len(layers), "AdapterConfig.layers")
    if config.share:
        sizes = {config.bottleneck_for(i, layers.hidden_size) for i in selected}
        if len(sizes) > 1:
            raise ValueError(f"AdapterConfig(share={config.share!r}) needs one bottleneck size for all adapted "
                             f"layers; reduction_factor={config.reduction_factor!r} gives {sorted(sizes)}")
    freeze(model, config)
    wanted = [name for name, on in zip(SITES, (config.mh_adapter, config.output_adapter)) if on]
    for index in selected:
        for name in wanted:
            site = layers.sites[index][name]
            factory = {**site.factory, **({} if dtype is None else {"dtype": dtype})}
            make = functools.partial(
                BottleneckAdapter, site.hidden_size, config.bottleneck_for(index, site.hidden_size),
                activation=config.non_linearity, ln_before=config.ln_before,
                original_ln_before=config.original_ln_before, residual_before_ln=config.residual_before_ln,
                scaling=config.scaling, dropout=config.dropout, init=config.init_weights, init_std=1e-2,
                zero_init_up=config.zero_init_up, **factory)
            adapter = make()
            if config.share:  # the adapters of one site name (attention, output) share one source
                shared.share(adapter, shared.source(model, name, make, config.private_rank), config.private_rank)
            sites.attach(site, adapter)
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


def _in_modules(name, modules):
    return any(f".{name}".find(f".{m}.") >= 0 for m in modules)


def unpatch(model: nn.Module) -> nn.Module:
    """Removes the fused adapters and restores the original modules and requires_grad flags."""
    if not is_patched(model):
        raise ValueError("model is not patched by ampfuse")
    sites.detach(model)
    for name, p in model.named_parameters():
        p.requires_grad_(model._ampfuse_requires_grad.get(name, p.requires_grad))
    del model._ampfuse_config, model._ampfuse_requires_grad
    return model


def trainable_parameters(model: nn.Module):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def print_trainable_parameters(model: nn.Module) -> str:
    """Prints (and returns) the trainable and total parameter counts; with adapters shared across
    layers, a second line: shared and private parameters against the same adapters unshared."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    counts = shared.summary(model)
    if counts is not None:
        held = counts["shared"] + counts["private"]
        line += (f"\nshared adapters: {counts['shared']:,} shared + {counts['private']:,} private params in "
                 f"{counts['adapters']} adapters || unshared: {counts['unshared']:,} || "
                 f"{100 * held / counts['unshared']:.2f}% of it, {counts['unshared'] / held:.1f}x fewer")
    print(line)
    return line


# ----------------------------------------------------------------------------- weights on disk (shared with models/)

def _dtensor():
    """FSDP2's sharded parameter class, or None where torch has no distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def save_weights(directory, tensors, config_name: str, meta: dict) -> None:
    """Writes ``tensors`` as safetensors (WEIGHTS_NAME) and ``meta`` as JSON (``config_name``).

    Under torch.distributed only rank 0 writes. Sharded tensors (FSDP2's DTensor parameters) are
    gathered to full ones first, a collective: under FSDP call this on every rank."""
    from safetensors.torch import save_file

    dtensor = _dtensor()
    full = {name: t.full_tensor() if dtensor and isinstance(t, dtensor) else t for name, t in tensors.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    os.makedirs(directory, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in full.items()}, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, config_name), "w") as f:
        json.dump(meta, f, indent=2)


def load_weights(own, directory) -> None:
    """Copies the weights save_weights wrote to ``directory`` into the model's tensors ``own``."""
    from safetensors.torch import load_file

    copy_weights(own, load_file(os.path.join(directory, WEIGHTS_NAME)), str(directory))


def copy_weights(own, tensors, source) -> None:
    """Copies ``tensors`` into the model's tensors ``own`` (same names, same shapes, or a
    ValueError saying what differs). Sharded targets get their shard."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights in {source} do not match this model: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    dtensor = _dtensor()
    with torch.no_grad():
        for name, target in own.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name}: saved shape {tuple(value.shape)}, this model has {tuple(target.shape)}")
            if dtensor and isinstance(target, dtensor):
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                          target.placements)
            target.copy_(value)


# ----------------------------------------------------------------------------- save / load

def adapter_state_dict(model: nn.Module):
    """The adapters' tensors and those of config.trainable_modules, keyed as in model.state_dict()."""
    modules = [ADAPTER, *model._ampfuse_config.trainable_modules]
    return {name: t for name, t in model.state_dict().items() if _in_modules(name, modules)}


def _shape_info(model):
    layers = sites.find(model)
    return {"num_layers": len(layers), "hidden_size": layers.hidden_size}


def save_adapters(model: nn.Module, directory: str) -> None:
    """Writes the adapter weights (safetensors) and the config plus model shape (JSON) to
    ``directory``. Under FSDP call it on every rank: rank 0 writes the full weights."""
    if not is_patched(model):
        raise ValueError("model is not patched by ampfuse: there are no adapters to save")
    meta = {"format": "ampfuse", "config": model._ampfuse_config.to_dict(), **_shape_info(model)}
    save_weights(directory, adapter_state_dict(model), CONFIG_NAME, meta)


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Loads adapters saved by save_adapters, patching ``model`` first if it is not patched."""
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
    load_weights(adapter_state_dict(model), directory)
    return model


# ----------------------------------------------------------------------------- adapters-library interop

_HUB_KEY = re.compile(r"^(.*)\.adapters\.([^.]+)\.(.+)$")  # <adapter layer module>.adapters.<name>.<tensor>


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
    layers = sites.find(model)
    if meta.get("hidden_size", layers.hidden_size) != layers.hidden_size:
        raise ValueError(f"the adapter in {directory} is for hidden size {meta['hidden_size']}, this model has "
                         f"{layers.hidden_size}")
    config = AdapterConfig.from_adapterhub(hub_config, num_layers=len(layers))
    if layers.family == "ALBERT" and config.mh_adapter:
        # adapters 1.x calls ALBERT's attention adapter with the attention's input as the hidden
        # states and its output as the residual, the other way round from every other family;
        # ampfuse adapts the attention output everywhere, so such weights would compute another function.
        raise ValueError("an adapters-library ALBERT adapter with mh_adapter=True cannot be loaded: that library "
                         "runs ALBERT's attention adapter on the attention input, ampfuse on its output")
    if is_patched(model):
        raise ValueError("model is already patched; load_adapterhub patches it with the adapter's own config")
    patch(model, config)
    copy_weights(adapter_state_dict(model), _hub_to_ampfuse(model, _load_hub_weights(directory), config.ln_before),
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
    linear = "adapter_down.1" if ln_before else "adapter_down.0"
    renames = {f"{linear}.weight": "down.weight", f"{linear}.bias": "down.bias", "adapter_up.weight": "up.weight",
               "adapter_up.bias": "up.bias", "scaling": "scaling",
               "adapter_norm_before.weight": "adapter_norm.weight", "adapter_norm_before.bias": "adapter_norm.bias"}
    layers = sites.find(model)
    located = sites.hub_prefixes(model, layers)
    names = {id(module): name for name, module in model.named_modules()}
    out = {}
    for key, value in hub.items():
        match = _HUB_KEY.match(key)
        where = match and located.get(sites.relative(model, match.group(1)))
        if not where:
            raise ValueError(f"unexpected key {key!r} in adapters-library weights")
        rest = match.group(3)
        if ln_before and rest.startswith("adapter_down.0."):
            continue  # the same LayerNorm as adapter_norm_before
        if rest not in renames:
            raise ValueError(f"adapters-library weight {key!r} has no counterpart in the fused adapter")
        holder = layers.sites[where[0]][where[1]].holder
        out[f"{names[id(holder)]}.{ADAPTER}.{renames[rest]}"] = value
    return out
