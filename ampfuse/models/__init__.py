"""Model wrappers: BERT-family models that take audio/visual (any named) inputs."""

from .multimodal import MultimodalConfig, MultimodalModel, MultimodalOutput, patch_multimodal

__all__ = ["MultimodalConfig", "MultimodalModel", "MultimodalOutput", "patch_multimodal"]
