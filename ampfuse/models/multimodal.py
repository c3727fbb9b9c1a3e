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
import json
import os
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..modules.fusion import FusionLayer
from ..modules.gmu import GMUAdapter, ModalityInputs
from ..ops.gmu import masked_mean
from ..patch import ADAPTER, attach, find_layers, freeze, patch, select_layers, transformer_layers

TASKS = ("regression", "classification", "multilabel")


@dataclasses.dataclass
class MultimodalConfig:
    """modalities: {name: feature size}. aligned: modalities come token-aligned (B, T, d_i) (True)
    or per sample (False: (B, d_i), or (B, L, d_i) with a (B, L) mask, mean-pooled).
    gmu_layers: layers whose feed-forward output gets a GMU adapter (None = all, [] = none).
    text_adapter: AdapterConfig of text-only bottleneck adapters (GMU sites override them).
    fusion_layers: layers after whose output a FusionLayer runs (token-aligned modalities only).
    task / num_labels: the head; regression predicts one score."""

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

    def __post_init__(self):
        if isinstance(self.text_adapter, dict):
            self.text_adapter = AdapterConfig.from_dict(self.text_adapter)
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
        return out


@dataclasses.dataclass
class MultimodalOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    last_hidden_state: Optional[torch.Tensor] = None
    gate_stats: Optional[dict] = None


class MultimodalModel(nn.Module):
    def __init__(self, model: nn.Module, config: MultimodalConfig):
        super().__init__()
        self.config = config
        self.inputs = ModalityInputs()
        if config.text_adapter is not None:
            patch(model, config.text_adapter)
        else:
            freeze(model, config)
        layers = find_layers(model)
        tail = layers[0][1]["output"]
        self.hidden_size = tail.LayerNorm.normalized_shape[0]
        factory = dict(device=tail.dense.weight.device, dtype=tail.dense.weight.dtype)
        for i in select_layers(config.gmu_layers, len(layers), "MultimodalConfig.gmu_layers"):
            attach(layers[i][1]["output"], GMUAdapter(
                self.hidden_size, config.modalities, config.bottleneck_size, inputs=self.inputs,
                activation=config.activation, gate=config.gate, form=config.form, stream_ln=config.stream_ln,
                scaling=config.scaling, zero_init_up=config.zero_init_up, **factory))
        self.encoder = model
        self.fusion = nn.ModuleDict()
        self._hooks = []
        for i in select_layers(config.fusion_layers, len(layers), "MultimodalConfig.fusion_layers"):
            fusion = FusionLayer(self.hidden_size, config.modalities, inputs=self.inputs, beta=config.fusion_beta,
                                 dropout=config.fusion_dropout, **factory)
            self.fusion[str(i)] = fusion
            self._hooks.append(transformer_layers(model)[i].register_forward_hook(_fusion_hook(fusion)))
        self.head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(self.hidden_size, config.num_labels,
                                                                             **factory))

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **modalities):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.inputs.values = self._modality_inputs(input_ids, modalities)
        try:
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        finally:
            self.inputs.values = {}
        logits = self.head(masked_mean(hidden, attention_mask))
        if self.config.task == "regression":
            logits = logits.squeeze(-1)
        return MultimodalOutput(logits=logits, loss=None if labels is None else self.loss(logits, labels),
                                last_hidden_state=hidden, gate_stats=self.gate_statistics())

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
        return {i: getattr(sites["output"], ADAPTER) for i, sites in find_layers(self.encoder)
                if isinstance(getattr(sites["output"], ADAPTER, None), GMUAdapter)}

    def track_gates(self, on: bool = True):
        """Keep the gate statistics of every GMU adapter of the next forwards in ``output.gate_stats``."""
        for adapter in self.gmu_adapters().values():
            adapter.track_gates = on
            adapter.gate_stats = None

    def gate_statistics(self):
        stats = {i: a.gate_stats for i, a in self.gmu_adapters().items() if a.gate_stats is not None}
        return stats or None

    def trainable_state_dict(self):
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, directory):
        """Writes the trainable weights (adapters, fusion layers, head) as safetensors, and the config."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({n: t.cpu().contiguous() for n, t in self.trainable_state_dict().items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "multimodal_config.json"), "w") as f:
            json.dump({"format": "ampfuse-multimodal", "config": self.config.to_dict()}, f, indent=2)

    def load_trainable(self, directory):
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
        own = dict(self.named_parameters())
        expected = set(self.trainable_state_dict())
        if set(tensors) != expected:
            raise ValueError(f"weights in {directory} do not match this model: missing "
                             f"{sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}")
        with torch.no_grad():
            for name, value in tensors.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"{name}: saved shape {tuple(value.shape)}, model has {tuple(own[name].shape)}")
                own[name].copy_(value)


def _fusion_hook(fusion):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fusion(output[0]), *output[1:])
        return fusion(output)
    return hook


def patch_multimodal(model: nn.Module, config: MultimodalConfig) -> MultimodalModel:
    """Freezes ``model``, adds the multimodal adapters, fusion layers and head of ``config``."""
    return MultimodalModel(model, config)
