"""Where adapters go in a BERT-family model: the residual sites of each layer, family by family.

Each sub-layer of a post-LayerNorm transformer layer ends the same way, ``LayerNorm(h + r)``: h is
the sub-layer's output, r its input. The fused adapter block replaces that LayerNorm call (it takes
h, r and the LayerNorm). Two ways to reach it:

* Residual tails (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa-v2): the sum and the LayerNorm
  live in a module of their own, ``forward(hidden_states, input_tensor) =
  LayerNorm(dropout(dense(hidden_states)) + input_tensor)`` (BertSelfOutput, BertOutput). attach()
  swaps the tail's class for a subclass that runs ``dense -> dropout -> adapter``.
* Inline sites (DistilBERT, ALBERT): the layer's own forward adds h and r and calls the LayerNorm.
  attach() swaps the LayerNorm's class for one that runs the adapter on h and r, which capture
  subclasses record in a thread-local slot while the layer runs: r as the input of the sub-layer's
  first module, h as the output of its last. The layer's own ``h + r`` is still computed and then
  unused (one elementwise add per site). This keeps the families' forwards (which differ between
  transformers 4 and 5) untouched; the adapters library's hook-based models use the same idea.

ALBERT runs ``num_hidden_groups * inner_group_num`` distinct layers ``num_hidden_layers`` times in
all, sharing their weights. Adapters attach to the distinct layer modules and are shared the same
way: layer i is the i-th distinct layer, and its adapter runs at every application of that layer
(as in the adapters library, which enumerates ALBERT's layers the same way).

Parameter names of the base model never change, so its state dict still loads; detach() swaps
every class back.
"""

import dataclasses
import threading
from typing import Dict, Tuple

from torch import nn

ADAPTER = "ampfuse_adapter"
SITES = ("attention", "output")  # the adapters library's mh_adapter and output_adapter locations


@dataclasses.dataclass(frozen=True)
class Site:
    """One ``LayerNorm(h + r)`` that an adapter can replace."""

    holder: nn.Module      # gets the adapter (child ADAPTER) and the fused forward
    norm: nn.Module        # the frozen LayerNorm the adapter is fused with
    hub: str               # the adapters library's adapter module here, relative to the layer
    captures: Tuple = ()   # inline sites: ((module, roles), ...); roles "r": record its input, "h": its output

    @property
    def hidden_size(self) -> int:
        return self.norm.normalized_shape[0]

    @property
    def factory(self) -> dict:
        """device and dtype of the frozen weights here, for the modules put at this site."""
        return {"device": self.norm.weight.device, "dtype": self.norm.weight.dtype}


@dataclasses.dataclass(frozen=True)
class Layers:
    """A model's transformer layers, bottom to top, and their sites."""

    family: str
    modules: Tuple[nn.Module, ...]        # the distinct layer modules
    sites: Tuple[Dict[str, Site], ...]    # per layer: {"attention": Site, "output": Site}
    shared: bool = False                  # each layer module runs more than once per forward (ALBERT)

    def __len__(self):
        return len(self.modules)

    @property
    def hidden_size(self) -> int:
        return self.sites[0]["output"].hidden_size


# ----------------------------------------------------------------------------- families

def _is(module, cls):
    return isinstance(module, cls)


def _bert_sites(layer):
    def tail(module):  # dense -> dropout -> LayerNorm(x + input_tensor); the LayerNorm is checked later
        return _is(getattr(module, "dense", None), nn.Linear) and _is(getattr(module, "dropout", None), nn.Dropout)

    attention, output = getattr(getattr(layer, "attention", None), "output", None), getattr(layer, "output", None)
    if not (tail(attention) and tail(output)):
        return None
    return {"attention": Site(attention, getattr(attention, "LayerNorm", None), "attention.output"),
            "output": Site(output, getattr(output, "LayerNorm", None), "output")}


def _distilbert_sites(layer):
    # TransformerBlock: sa_layer_norm(attention(x) + x); output_layer_norm(ffn(sa) + sa). The
    # attention's output is out_lin's (no dropout after it); its input x is q_lin's input.
    attention, ffn = getattr(layer, "attention", None), getattr(layer, "ffn", None)
    q_lin, out_lin = getattr(attention, "q_lin", None), getattr(attention, "out_lin", None)
    sa_norm, out_norm = getattr(layer, "sa_layer_norm", None), getattr(layer, "output_layer_norm", None)
    if not (_is(q_lin, nn.Linear) and _is(out_lin, nn.Linear) and _is(getattr(ffn, "lin2", None), nn.Linear)
            and sa_norm is not None and out_norm is not None):
        return None
    return {"attention": Site(sa_norm, sa_norm, "attention_adapters", ((q_lin, "r"), (out_lin, "h"))),
            "output": Site(out_norm, out_norm, "output_adapters", ((ffn, "rh"),))}


def _albert_sites(layer):
    # AlbertAttention: LayerNorm(x + output_dropout(dense(context))), x the input of query.
    # AlbertLayer: full_layer_layer_norm(ffn_output(act(ffn(a))) + a), a the input of ffn.
    attention = getattr(layer, "attention", None)
    query, dropout = getattr(attention, "query", None), getattr(attention, "output_dropout", None)
    ffn, ffn_output = getattr(layer, "ffn", None), getattr(layer, "ffn_output", None)
    attention_norm, full_norm = getattr(attention, "LayerNorm", None), getattr(layer, "full_layer_layer_norm", None)
    if not (_is(query, nn.Linear) and _is(dropout, nn.Dropout) and _is(ffn, nn.Linear) and _is(ffn_output, nn.Linear)
            and attention_norm is not None and full_norm is not None):
        return None
    return {"attention": Site(attention_norm, attention_norm, "attention.attention_adapters",
                              ((query, "r"), (dropout, "h"))),
            "output": Site(full_norm, full_norm, "output_adapters", ((ffn, "r"), (ffn_output, "h")))}


def _stack(model, sites):
    """The first non-empty nn.ModuleList whose every element has the family's sites."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(sites(layer) for layer in module):
            return list(module)
    return None


def _albert_stack(model, sites):
    """ALBERT's distinct layers: albert_layer_groups[g].albert_layers[j], flattened."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                isinstance(getattr(group, "albert_layers", None), nn.ModuleList) for group in module):
            layers = [layer for group in module for layer in group.albert_layers]
            if layers and all(sites(layer) for layer in layers):
                return layers
    return None


# name, how to find the layer modules, their sites, whether a layer module runs more than once
FAMILIES = (
    ("BERT-style (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DeBERTa-v2)", _stack, _bert_sites, False),
    ("DistilBERT", _stack, _distilbert_sites, False),
    ("ALBERT", _albert_stack, _albert_sites, True),
)


def _family_name(model):
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _refusal(model, family, modules, sites):
    """Why the fused block cannot express this model's sites, or None."""
    for site in (s for per_layer in sites for s in per_layer.values()):
        norm = site.norm
        if norm is None:
            return ("its residual sub-layers end without a LayerNorm (a pre-LayerNorm model), and the fused block "
                    "fuses the LayerNorm that follows the residual sum")
        if type(norm) is not nn.LayerNorm and getattr(type(norm), "_ampfuse_base", None) is not nn.LayerNorm:
            return (f"its residual LayerNorm is {type(norm).__name__}, not torch.nn.LayerNorm, which is what the "
                    "fused block computes")
        if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
            return "its residual LayerNorm has no elementwise weight and bias over the last dimension"
    if family == "ALBERT":
        chunks = {getattr(layer, "chunk_size_feed_forward", 0) for layer in modules}
        if chunks - {0}:
            return (f"chunk_size_feed_forward={max(chunks)} runs its feed-forward block in chunks, and the fused "
                    "block needs the whole sub-layer output (set config.chunk_size_feed_forward = 0)")
    return None


def find(model: nn.Module) -> Layers:
    """The model's layers and sites. A model of no known family, or of a family whose sites the
    fused block cannot express, raises a ValueError that says which and why."""
    for family, stack, sites, shared in FAMILIES:
        modules = stack(model, sites)
        if modules:
            per_layer = tuple(sites(layer) for layer in modules)
            reason = _refusal(model, family, modules, per_layer)
            if reason:
                raise ValueError(f"ampfuse cannot patch this {_family_name(model)} model ({type(model).__name__}, "
                                 f"{family} layers): {reason}")
            return Layers(family, tuple(modules), per_layer, shared)
    raise ValueError(f"{type(model).__name__} ({_family_name(model)}) has no BERT-style layers: expected an "
                     f"nn.ModuleList of transformer layers of a supported family: {', '.join(f[0] for f in FAMILIES)}")


# ----------------------------------------------------------------------------- attach / detach

_operands = threading.local()  # h and r of the inline site now running, per thread


def _tail_forward(self, hidden_states, input_tensor):
    return getattr(self, ADAPTER)(self.dropout(self.dense(hidden_states)), input_tensor, self.LayerNorm)


def _capture_forward(self, *args, **kwargs):
    roles = self._ampfuse_captures
    if "r" in roles:
        _operands.r = args[0] if args else next(iter(kwargs.values()))
    out = self._ampfuse_base.forward(self, *args, **kwargs)
    if "h" in roles:
        _operands.h = out
    return out


def _norm_forward(self, summed):
    h, r = getattr(_operands, "h", None), getattr(_operands, "r", None)
    _operands.h = _operands.r = None
    if h is None or r is None or h.shape != summed.shape or r.shape != summed.shape:
        raise RuntimeError(
            "an adapted LayerNorm ran without the sub-layer output and input its layer records as it runs: this "
            "layer's forward does not have the structure ampfuse patched (LayerNorm(h + r) after the recorded "
            "modules, whole tensors, no chunking)")
    return getattr(self, ADAPTER)(h, r, self)


_SWAPPED = {}


def _swap(module, forward):
    if hasattr(type(module), "_ampfuse_base"):
        return
    cls = type(module)
    if (cls, forward) not in _SWAPPED:
        _SWAPPED[cls, forward] = type(f"AmpFused{cls.__name__}", (cls,), {"forward": forward, "_ampfuse_base": cls})
    module.__class__ = _SWAPPED[cls, forward]


def attach(site: Site, adapter: nn.Module) -> None:
    """Makes ``site`` run ``adapter(h, r, layer_norm)`` in place of ``LayerNorm(h + r)``."""
    site.holder.add_module(ADAPTER, adapter)
    _swap(site.holder, _norm_forward if site.captures else _tail_forward)
    for module, roles in site.captures:
        module._ampfuse_captures = roles
        _swap(module, _capture_forward)


def detach(model: nn.Module) -> None:
    """Removes every adapter attach() added under ``model`` and restores the original classes."""
    for module in model.modules():
        if ADAPTER in module._modules:
            delattr(module, ADAPTER)
        base = getattr(type(module), "_ampfuse_base", None)
        if base is not None:
            module.__class__ = base
        module.__dict__.pop("_ampfuse_captures", None)


def adapters(layers: Layers) -> Dict[Tuple[int, str], nn.Module]:
    """{(layer, site): adapter} of the attached adapters."""
    return {(i, name): getattr(site.holder, ADAPTER) for i, sites in enumerate(layers.sites)
            for name, site in sites.items() if ADAPTER in site.holder._modules}


def hub_prefixes(model: nn.Module, layers: Layers) -> Dict[str, Tuple[int, str]]:
    """{module path of the adapters library's adapter layer: (layer, site)}, relative to the base
    model (``base_model_prefix`` dropped), so keys saved from a head model and a base model match."""
    names = {id(module): name for name, module in model.named_modules()}
    return {relative(model, f"{names[id(layer)]}.{site.hub}"): (i, name)
            for i, (layer, sites) in enumerate(zip(layers.modules, layers.sites)) for name, site in sites.items()}


def relative(model: nn.Module, path: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path
