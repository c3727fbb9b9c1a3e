"""A frozen BERT-family model that also takes audio, visual (any named) features: patch_multimodal.

    model = transformers.AutoModel.from_pretrained(path)
    mm = ampfuse.patch_multimodal(model, ampfuse.MultimodalConfig({"audio": 74, "visual": 35}))
    out = mm(input_ids, attention_mask, audio=A, visual=V, labels=y)     # out.loss, out.logits

GMU adapters sit at the feed-forward output of ``gmu_layers``; optional text-only bottleneck
adapters (``text_adapter``) elsewhere; optional fusion layers after ``fusion_layers``; a small
trainable head on the masked-mean-pooled last hidden state: regression (one score, L1 loss),
classification (cross-entropy) or multi-label (binary cross-entropy).
"""

import dataclasses
import functools
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import sites
from ..config import AdapterConfig
from ..context import ForwardContext, in_context
from ..modules.fusion import FusionLayer
from ..modules import shared
from ..modules.gmu import GMUAdapter
from ..ops.gmu import masked_mean
from ..patch import freeze, load_weights, patch, save_weights, select_layers

TASKS = ("regression", "classification", "multilabel")


@dataclasses.dataclass
class MultimodalConfig:
    """modalities: {name: feature size}. aligned: modalities come token-aligned (B, T, d_i) (True)
    or per sample (False: (B, d_i), or (B, L, d_i) with a (B, L) mask, mean-pooled).
    gmu_layers: layers whose feed-forward output gets a GMU adapter (None = all, [] = none).
    text_adapter: AdapterConfig of text-only bottleneck adapters (GMU sites override them).
    fusion_layers: layers after whose output a FusionLayer runs (token-aligned modalities only).
    task / num_labels: the head; regression predicts one score.
    share / private_rank: "layers" shares the GMU adapters' stream projections, gates and
        up-projection across gmu_layers as W + U_l V_l^T, U_l V_l^T of rank private_rank (0: fully
        shared, vectors too), as AdapterConfig's share and private_rank do for the text adapters;
        "layers+modalities" also makes modalities of equal feature size share one stream projection
        (and stream LayerNorm), each modality of each layer with its own rank-r part."""

    modalities: Dict[str, int] = dataclasses.field(default_factory=dict)
    aligned: bool = True
    gmu_layers: Optional[Sequence[int]] = None
    bottleneck_size: int = 64
    activation: str = "relu"
    gate: str = "auto"
    form: str = "direct"
    stream_ln: bool = True
    scaling: float = 1.0
    zero_init_up: bool = True
    text_adapter: Optional[AdapterConfig] = None
    fusion_layers: Sequence[int] = ()
    fusion_beta: float = 1.0
    fusion_dropout: float = 0.1
    task: str = "regression"
    num_labels: int = 1
    head_dropout: float = 0.1
    trainable_modules: Sequence[str] = ()  # read by ampfuse.patch.freeze
    share: Optional[str] = None
    private_rank: int = 0

    def __post_init__(self):
        if isinstance(self.text_adapter, dict):
            self.text_adapter = AdapterConfig.from_dict(self.text_adapter)
        self.private_rank = shared.check_share("MultimodalConfig", self.share, self.private_rank)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "regression":
            self.num_labels = 1
        if self.fusion_layers and not self.aligned:
            raise ValueError("fusion layers need token-aligned modalities (aligned=True)")
        if not self.modalities:  # a text-only model
            if self.fusion_layers or self.gmu_layers:
                raise ValueError("GMU adapters and fusion layers need at least one modality")
            self.gmu_layers = []

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["text_adapter"] = None if self.text_adapter is None else self.text_adapter.to_dict()
        if self.share is None:  # unshared configs are saved exactly as before sharing existed
            del out["share"], out["private_rank"]
        return out


@dataclasses.dataclass
class MultimodalOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    gate_stats: Optional[dict] = None


class MultimodalModel(nn.Module):
    """The frozen ``model`` with GMU adapters, fusion layers and a head (see patch_multimodal).

    The modality tensors of a forward reach the adapters and fusion layers through a thread-local
    ampfuse.context.ForwardContext, so threads can share one model. Gradient checkpointing (the
    encoder's ``gradient_checkpointing_enable``, reentrant or not) works: each forward makes the
    encoder's checkpoint function re-enter that forward's context when backward recomputes a layer.
    """

    def __init__(self, model: nn.Module, config: MultimodalConfig):
        super().__init__()
        self.config = config
        layers = sites.find(model)
        gmu_layers = select_layers(config.gmu_layers, len(layers), "MultimodalConfig.gmu_layers")
        fusion_layers = select_layers(config.fusion_layers, len(layers), "MultimodalConfig.fusion_layers")
        if fusion_layers and layers.shared:
            raise ValueError(f"fusion layers go after a layer that runs once per forward, and {layers.family} runs "
                             "each of its shared layer modules several times")
        if config.text_adapter is not None:
            patch(model, config.text_adapter)
        else:
            freeze(model, config)
        self.hidden_size = layers.hidden_size
        for i in gmu_layers:
            site = layers.sites[i]["output"]
            make = functools.partial(
                GMUAdapter, site.hidden_size, config.modalities, config.bottleneck_size, activation=config.activation,
                gate=config.gate, form=config.form, stream_ln=config.stream_ln, scaling=config.scaling,
                zero_init_up=config.zero_init_up, **site.factory)
            adapter = make()
            if config.share:
                aliases = adapter.modality_aliases() if config.share == "layers+modalities" else None
                source = shared.source(model, "gmu", make, config.private_rank, aliases)
                shared.share(adapter, source, config.private_rank, aliases)
            sites.attach(site, adapter)
        shared.prune(model)  # shared text adapters whose every site a GMU adapter took
        self.encoder = model
        self.fusion = nn.ModuleDict()
        self._hooks = []
        for i in fusion_layers:
            fusion = FusionLayer(self.hidden_size, config.modalities, beta=config.fusion_beta,
                                 dropout=config.fusion_dropout, **layers.sites[i]["output"].factory)
            self.fusion[str(i)] = fusion
            # a partial, not a closure, so that deepcopy(model) hooks the copied fusion layer
            self._hooks.append(layers.modules[i].register_forward_hook(functools.partial(_apply_fusion, fusion)))
        self.head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(self.hidden_size, config.num_labels,
                                                                             **layers.sites[-1]["output"].factory))
        self._checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **modalities):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        context = ForwardContext(self._modality_inputs(input_ids, modalities))
        self._checkpoint_in_context()
        with context:
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.head(masked_mean(hidden, attention_mask))
        if self.config.task == "regression":
            logits = logits.squeeze(-1)
        gate_stats = None
        if context.records:
            gate_stats = {i: context.records[a] for i, a in self.gmu_adapters().items() if a in context.records}
        return MultimodalOutput(logits=logits, loss=None if labels is None else self.loss(logits, labels),
                                last_hidden_state=hidden, gate_stats=gate_stats)

    def _checkpoint_in_context(self):
        # Hugging Face layers checkpoint through module._gradient_checkpointing_func, which
        # gradient_checkpointing_enable() sets; recomputation in backward runs outside this
        # forward's context (and maybe on another thread) unless the function re-enters it.
        for module in self._checkpointing:
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if fn is not None and not getattr(fn, "_ampfuse_in_context", False):
                module._gradient_checkpointing_func = in_context(fn)

    def loss(self, logits, labels):
        if self.config.task == "regression":
            return F.l1_loss(logits, labels.to(logits.dtype))
        if self.config.task == "classification":
            return F.cross_entropy(logits, labels)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def _modality_inputs(self, input_ids, given):
        names = list(self.config.modalities)
        masks = {n[:-len("_mask")] for n in given if n.endswith("_mask")}
        unknown = sorted(set(given) - set(names) - {f"{m}_mask" for m in masks & set(names)})
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}; this model takes modalities {names} (and <name>_mask)")
        B, T = input_ids.shape
        values = {}
        for name in names:
            size = self.config.modalities[name]
            if name not in given:
                raise ValueError(f"missing modality input {name!r}: pass {name}=tensor of shape "
                                 + (f"({B}, {T}, {size})" if self.config.aligned else f"({B}, {size}) or "
                                    f"({B}, L, {size}) with {name}_mask"))
            value, mask = given[name], given.get(f"{name}_mask")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"modality {name!r} must be a floating-point tensor")
            if self.config.aligned:
                if tuple(value.shape) != (B, T, size):
                    raise ValueError(f"modality {name!r} must be token-aligned with shape ({B}, {T}, {size}), "
                                     f"got {tuple(value.shape)}")
            elif value.dim() == 3 and value.shape[0] == B and value.shape[2] == size:
                if mask is not None and tuple(mask.shape) != tuple(value.shape[:2]):
                    raise ValueError(f"{name}_mask must have shape {tuple(value.shape[:2])}, got {tuple(mask.shape)}")
                value = masked_mean(value, mask)
            elif tuple(value.shape) != (B, size):
                raise ValueError(f"modality {name!r} must have shape ({B}, {size}) or ({B}, L, {size}), "
                                 f"got {tuple(value.shape)}")
            values[name] = value
        return values

    # ------------------------------------------------------------------ inspection and weights

    def gmu_adapters(self):
        return {i: adapter for (i, site), adapter in sites.adapters(sites.find(self.encoder)).items()
                if site == "output" and isinstance(adapter, GMUAdapter)}

    def track_gates(self, on: bool = True):
        """Keep the gate statistics of every GMU adapter of the next forwards in ``output.gate_stats``."""
        for adapter in self.gmu_adapters().values():
            adapter.track_gates = on
            adapter.gate_stats = None

    def gate_statistics(self):
        """The latest gate statistics of each GMU adapter (of whichever thread ran last: a forward's
        own are in its ``output.gate_stats``)."""
        stats = {i: a.gate_stats for i, a in self.gmu_adapters().items() if a.gate_stats is not None}
        return stats or None

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, directory):
        """Writes the trainable weights (adapters, fusion layers, head) as safetensors, and the config.
        Under FSDP call it on every rank: rank 0 writes the full weights."""
        save_weights(directory, self.trainable_state_dict(), "multimodal_config.json",
                     {"format": "ampfuse-multimodal", "config": self.config.to_dict()})

    def load_trainable(self, directory):
        load_weights(self.trainable_state_dict(), directory)


def _apply_fusion(fusion, module, args, output):
    if isinstance(output, tuple):
        return (fusion(output[0]), *output[1:])
    return fusion(output)


def patch_multimodal(model: nn.Module, config: MultimodalConfig) -> MultimodalModel:
    """Freezes ``model``, adds the multimodal adapters, fusion layers and head of ``config``."""
    return MultimodalModel(model, config)
