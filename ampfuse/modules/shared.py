"""Adapters shared across layers, each layer with a low-rank private part (issue 17).

A group of adapters of one kind (all feed-forward adapters of a model, say) shares one *source*:
an adapter of the same class and shapes that never runs. Layer l computes with

    W_l = W + U_l V_l^T        for every matrix W of the source (rank r = private_rank; r = 0: W_l = W)
    b_l = layer l's own b      for every vector (biases, learned scaling, LayerNorm weights), r > 0
    b_l = the source's b       r = 0: the whole adapter is shared

A per-layer full-width vector is what "shared vector + per-layer delta" would be, with the same
functions and one tensor fewer to add per call, so vectors are either private (r > 0) or shared.
U_l starts at zero (layer l starts as the shared adapter; V_l random, as LoRA's A), so
``zero_init_up`` still starts the model as the frozen one.

The source is a child of the model's root (``model.ampfuse_adapter[group]``), not of any layer:
its parameters are registered, counted and saved once, under one name, and FSDP's per-layer
units do not shard away a weight the other layers read. A layer's adapter reaches it through a
plain attribute (a ``Link``, not a submodule). Its own parameters are what is private: U_l and
V_l, registered beside the matrix they belong to as ``<name>_u`` (rows x r) and ``<name>_v``
(columns x r), and its vectors when r > 0. Parameters that moved to the source stay as None
entries, so they are in no state dict.

W_l is formed on every call (one addmm per matrix, in the parameters' dtype also under
autocast), then the fused op runs on it as on an unshared adapter's weight; backward gives the op's
dW_l to W (summed over layers), U_l (dW_l V_l) and V_l (dW_l^T U_l). The README's "Shared
adapters" section has what forming costs next to the op.
"""

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..sites import ADAPTER as SOURCES  # the name unpatch (sites.detach) and save_adapters look for

SHARES = ("layers", "layers+modalities")  # AdapterConfig takes the first only: text adapters have one stream


class Link:
    """How one adapter takes its tensors from its source: names, owners and attributes, resolved
    when shared and read on every call (FSDP swaps parameters, never the modules that own them)."""

    def __init__(self, source: nn.Module, rank: int, matrices: List[Tuple], vectors: List[Tuple]):
        self.source, self.rank = source, rank
        self.matrices = matrices    # (name, source owner, its attribute, own owner, own attribute)
        self.vectors = vectors      # (name, owner (the source's at rank 0, this adapter's otherwise), attribute)


def check_share(what: str, share, private_rank, shares=SHARES) -> int:
    """Validates a config's share / private_rank pair; returns private_rank as an int."""
    if share is not None and share not in shares:
        raise ValueError(f"{what}.share must be None or one of {shares}, got {share!r}")
    if isinstance(private_rank, bool) or not isinstance(private_rank, int) or private_rank < 0:
        raise ValueError(f"{what}.private_rank must be an int >= 0, got {private_rank!r}")
    if private_rank and share is None:
        raise ValueError(f"{what}.private_rank={private_rank} needs share='layers' (private parts of a shared "
                         "adapter)")
    return private_rank


def _owner(module: nn.Module, name: str) -> Tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def _drop(owner: nn.Module, attr: str) -> None:
    owner._parameters[attr] = None  # reads as None and is in no state dict or parameter list


def source(model: nn.Module, group: str, build: Callable[[], nn.Module], private_rank: int,
           aliases: Optional[Dict[str, str]] = None) -> nn.Module:
    """``model``'s shared source ``group``: the first time an adapter from ``build()`` made the
    source (without its vectors when private_rank > 0: every layer has its own; without the
    parameters ``aliases`` maps to others), afterwards the same one."""
    sources = model._modules.get(SOURCES)
    if sources is None:
        sources = nn.ModuleDict()
        model.add_module(SOURCES, sources)
    if group not in sources:
        adapter = build()
        matrices, aliases = set(adapter.shared_matrices()), aliases or {}
        for name, _ in list(adapter.named_parameters()):
            if name in aliases or (private_rank and name not in matrices):
                _drop(*_owner(adapter, name))
        adapter._ampfuse_source_of = group
        sources[group] = adapter
    return sources[group]


def share(adapter: nn.Module, src: nn.Module, private_rank: int, aliases: Optional[Dict[str, str]] = None):
    """Makes ``adapter`` (fresh, of ``src``'s class and shapes) one layer's view of ``src``: its
    matrices become src's plus a rank-``private_rank`` part of its own, its vectors stay its own
    (rank > 0) or become src's (rank 0). ``aliases``: {parameter: the source parameter it shares}
    (e.g. the stream projection of one modality reads another's of equal width)."""
    if type(adapter) is not type(src):
        raise TypeError(f"a {type(adapter).__name__} cannot share the parameters of a {type(src).__name__}")
    shared_matrices, aliases = set(adapter.shared_matrices()), aliases or {}
    matrices, vectors = [], []
    for name, param in list(adapter.named_parameters()):
        owner, attr = _owner(adapter, name)
        src_owner, src_attr = _owner(src, aliases.get(name, name))
        if name in shared_matrices:
            _check_shape(name, param, getattr(src_owner, src_attr))
            _drop(owner, attr)
            if private_rank:
                rows, cols = param.shape[-2:]
                if private_rank >= min(rows, cols):
                    raise ValueError(f"private_rank={private_rank} must be below the smaller side of {name}, "
                                     f"{tuple(param.shape[-2:])} (a rank-{min(rows, cols)} part is a full matrix)")
                u = torch.zeros(*param.shape[:-1], private_rank, device=param.device, dtype=param.dtype)
                v = torch.empty(*param.shape[:-2], cols, private_rank, device=param.device, dtype=param.dtype)
                with torch.no_grad():
                    v.normal_(0.0, cols ** -0.5)
                owner.register_parameter(f"{attr}_u", nn.Parameter(u))
                owner.register_parameter(f"{attr}_v", nn.Parameter(v))
            matrices.append((name, src_owner, src_attr, owner, attr))
        elif private_rank:
            vectors.append((name, owner, attr))
        else:
            _check_shape(name, param, getattr(src_owner, src_attr))
            _drop(owner, attr)
            vectors.append((name, src_owner, src_attr))
    adapter._ampfuse_share = Link(src, private_rank, matrices, vectors)
    return adapter


def _check_shape(name, param, shared):
    if shared is None or shared.shape != param.shape:
        raise ValueError(f"adapters shared across layers need one shape per parameter: {name} is "
                         f"{tuple(param.shape)} here, {None if shared is None else tuple(shared.shape)} in the "
                         "shared adapter")


def _form(w: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """w + u v^T in one kernel (batched over leading dimensions for stacks of matrices)."""
    if w.dim() == 2:
        return torch.addmm(w, u, v.t())
    return torch.baddbmm(w, u, v.transpose(1, 2))


def _get(owner: nn.Module, attr: str) -> Tensor:
    # owner._parameters, where FSDP2 puts its unsharded parameters too, is a dict lookup; nn.Module's
    # attribute lookup (the fallback, for wrappers that set plain tensor attributes) costs ~1 us
    param = owner._parameters.get(attr)
    return param if param is not None else getattr(owner, attr)


def tensors(adapter: nn.Module) -> Dict[str, Tensor]:
    """{parameter name: tensor} that a sharing adapter computes with, keyed as an unshared
    adapter's parameters are."""
    link = adapter._ampfuse_share
    out = {name: _get(owner, attr) for name, owner, attr in link.vectors}
    if not link.rank:
        out.update((name, _get(src, src_attr)) for name, src, src_attr, _, _ in link.matrices)
        return out
    if not link.matrices:
        return out
    device = _get(link.matrices[0][1], link.matrices[0][2]).device.type
    # formed in the parameters' dtype, as the op gets an unshared adapter's weights under autocast
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        for name, src, src_attr, own, attr in link.matrices:
            out[name] = _form(_get(src, src_attr), _get(own, f"{attr}_u"), _get(own, f"{attr}_v"))
    return out


def describe(adapter: nn.Module) -> str:
    """", shared (private rank r)" for a sharing adapter, "" otherwise (for extra_repr)."""
    link = getattr(adapter, "_ampfuse_share", None)
    if link is not None:
        return f", shared (private rank {link.rank})"
    if getattr(adapter, "_ampfuse_source_of", None):
        return f", shared source of the {adapter._ampfuse_source_of!r} adapters"
    return ""


def prune(model: nn.Module) -> None:
    """Removes the sources no adapter of ``model`` reads any more (their adapters were replaced)."""
    sources = model._modules.get(SOURCES)
    if sources is None:
        return
    used = {id(link.source) for link in (getattr(m, "_ampfuse_share", None) for m in model.modules()) if link}
    for group in [g for g, s in sources.items() if id(s) not in used]:
        del sources[group]
    if not len(sources):
        del model._modules[SOURCES]


def summary(model: nn.Module) -> Optional[dict]:
    """Parameter counts of ``model``'s shared adapters, or None if none shares: ``shared`` (the
    sources'), ``private`` (the sharing adapters' own) and ``unshared`` (what the same adapters
    would hold unshared: each one the source's full set)."""
    links = [(m, m._ampfuse_share) for m in model.modules() if getattr(m, "_ampfuse_share", None) is not None]
    if not links:
        return None
    sources = {id(link.source): link.source for _, link in links}
    shared = sum(p.numel() for s in sources.values() for p in s.parameters())
    private = sum(p.numel() for m, _ in links for p in m.parameters())
    unshared = 0
    for m, link in links:
        unshared += sum(getattr(src, attr).numel() for _, src, attr, _, _ in link.matrices)
        unshared += sum(getattr(owner, attr).numel() for _, owner, attr in link.vectors)
    return {"shared": shared, "private": private, "unshared": unshared, "adapters": len(links)}
