"""AdapterConfig: where fused bottleneck adapters go in a BERT-family model and what they look like.

The fields mean what the same fields of the ``adapters`` library's ``BnConfig`` mean
(``SeqBnConfig`` = Pfeiffer, ``DoubleSeqBnConfig`` = Houlsby), restricted to what the fused
adapter block computes.
"""

import dataclasses
from typing import Mapping, Optional, Sequence, Union

from .modules.shared import check_share
from .ops.activations import canonical

# adapters-library options the fused op does not implement; a config that turns them on is refused.
_UNSUPPORTED_ADAPTERHUB = {
    "ln_after": False, "is_parallel": False, "use_gating": False, "phm_layer": False, "cross_adapter": False,
    "original_ln_after": True, "adapter_residual_before_ln": False, "inv_adapter": None, "stochastic_depth": 0.0,
}


@dataclasses.dataclass
class AdapterConfig:
    """Fused bottleneck adapters for every selected layer.

    bottleneck_size / reduction_factor: the width k (bottleneck_size wins; else
        hidden_size // reduction_factor, which may be a mapping {"default": r, "<layer>": r}).
    non_linearity: relu | gelu | gelu_tanh | silu (swish) | tanh | identity.
    mh_adapter: an adapter after the attention output; output_adapter: after the feed-forward output.
    original_ln_before, residual_before_ln, ln_before, scaling (float | "learned" | "channel"),
    dropout: as in the adapters library (and docs/design.md section 2).
    init_weights: "bert" | "houlsby" | "lora"; zero_init_up: start as the exact frozen model.
    layers: indices of the layers to adapt (negative counts from the top); None = all.
    trainable_modules: names of base-model modules that stay trainable (e.g. ("classifier",) for a
        task head); their parameters are saved with the adapters.
    share: None (every adapter its own weights) or "layers": the adapters of each site (feed-forward;
        attention with mh_adapter) share one set across the adapted layers, layer l computing with
        W + U_l V_l^T for each matrix, U_l V_l^T of rank ``private_rank`` (0: fully shared, biases and
        scaling too; > 0: each layer also keeps its own biases, scaling and LayerNorm vectors).
        See ampfuse.modules.shared and the README's "Shared adapters".
    """

    bottleneck_size: Optional[int] = None
    reduction_factor: Union[float, Mapping[str, float]] = 16
    non_linearity: str = "relu"
    mh_adapter: bool = False
    output_adapter: bool = True
    original_ln_before: bool = True
    residual_before_ln: bool = True
    ln_before: bool = False
    scaling: Union[float, str] = 1.0
    dropout: float = 0.0
    init_weights: str = "bert"
    zero_init_up: bool = False
    layers: Optional[Sequence[int]] = None
    trainable_modules: Sequence[str] = ()
    share: Optional[str] = None
    private_rank: int = 0

    def __post_init__(self):
        self.non_linearity = canonical(self.non_linearity)
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("AdapterConfig: at least one of mh_adapter, output_adapter must be True")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
        self.trainable_modules = [str(m) for m in self.trainable_modules]
        if isinstance(self.scaling, int):
            self.scaling = float(self.scaling)
        self.private_rank = check_share("AdapterConfig", self.share, self.private_rank, shares=("layers",))

    @classmethod
    def pfeiffer(cls, **overrides) -> "AdapterConfig":
        """The adapters library's SeqBnConfig: one adapter after the feed-forward block."""
        return cls(**{"original_ln_before": True, "mh_adapter": False, "output_adapter": True,
                      "non_linearity": "relu", **overrides})

    @classmethod
    def houlsby(cls, **overrides) -> "AdapterConfig":
        """The adapters library's DoubleSeqBnConfig: adapters after attention and feed-forward."""
        return cls(**{"original_ln_before": False, "mh_adapter": True, "output_adapter": True,
                      "non_linearity": "swish", **overrides})

    def bottleneck_for(self, layer: int, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return int(self.bottleneck_size)
        factor = self.reduction_factor
        if isinstance(factor, Mapping):
            factor = factor.get(str(layer), factor.get("default"))
            if factor is None:
                raise ValueError(f"reduction_factor has no entry for layer {layer} and no 'default'")
        return max(1, int(hidden_size // factor))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.reduction_factor, Mapping):
            out["reduction_factor"] = dict(self.reduction_factor)
        if self.share is None:  # unshared configs are saved exactly as before sharing existed
            del out["share"], out["private_rank"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "AdapterConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_adapterhub(cls, config: Mapping, num_layers: Optional[int] = None) -> "AdapterConfig":
        """Translates an adapters-library bottleneck config dict (as in its adapter_config.json)."""
        for key, default in _UNSUPPORTED_ADAPTERHUB.items():
            if config.get(key, default) != default:
                raise ValueError(f"adapters-library option {key}={config[key]!r} is not supported by the fused "
                                 f"adapter block (supported: {key}={default!r})")
        if config.get("residual_before_ln", True) == "post_add":
            raise ValueError("adapters-library option residual_before_ln='post_add' is not supported")
        leave_out = set(config.get("leave_out") or [])
        layers = None
        if leave_out:
            if num_layers is None:
                raise ValueError("an adapters config with leave_out needs the model's number of layers")
            layers = [i for i in range(num_layers) if i not in leave_out]
        return cls(
            reduction_factor=config.get("reduction_factor", 16), non_linearity=config["non_linearity"],
            mh_adapter=bool(config["mh_adapter"]), output_adapter=bool(config["output_adapter"]),
            original_ln_before=bool(config.get("original_ln_before", False)),
            residual_before_ln=bool(config.get("residual_before_ln", True)), ln_before=bool(config.get("ln_before")),
            scaling=config.get("scaling", 1.0), dropout=float(config.get("dropout", 0.0)),
            init_weights=config.get("init_weights", "bert").replace("mam_adapter", "lora"), layers=layers)
