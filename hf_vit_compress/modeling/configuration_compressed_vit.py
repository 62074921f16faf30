"""Configuration of a compressed ViT/DeiT: one global hidden width and per-block shapes.

Shipped to the Hub beside the weights (trust_remote_code), so it imports only transformers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

LAYER_FIELDS = ("num_heads", "qk_head_dim", "v_head_dim", "intermediate_size", "scaling")


class CompressedViTConfig(PreTrainedConfig):
    r"""
    Configuration of [`CompressedViTForImageClassification`]: a ViT/DeiT whose blocks may all have different
    shapes after structured pruning.

    Args:
        hidden_size (`int`, defaults to 768):
            Width of the residual stream (the kept embedding channels), shared by every block.
        layers (`list[dict]`):
            One entry per KEPT block (removed blocks are absent), each with `num_heads`, `qk_head_dim` (query/key
            channels per head), `v_head_dim` (value channels per head), `intermediate_size` (MLP width) and
            `scaling` (the attention logit scale; kept at the dense model's `head_dim ** -0.5` after pruning).
            `num_heads` or `intermediate_size` may be 0: that sub-layer then only adds its output bias.
        image_size, patch_size, num_channels, hidden_act, layer_norm_eps, qkv_bias, hidden_dropout_prob,
        attention_probs_dropout_prob, initializer_range:
            As in `ViTConfig`.
        use_distillation_token (`bool`, defaults to `False`):
            Whether the embeddings carry DeiT's distillation token after the class token.
        distillation_head (`bool`, defaults to `False`):
            Whether there are two heads (`cls_classifier` on the class token, `distillation_classifier` on the
            distillation token, logits = their mean), as in `DeiTForImageClassificationWithTeacher`.
        source_model_type (`str`, defaults to `"vit"`):
            model_type of the dense model this was compressed from (informational).
        kernel_support (`dict`, *optional*):
            Informational, written by the exporter: per dtype (`"bfloat16"`, `"float32"`), the
            `scaled_dot_product_attention` backends of CUDA GPUs that every block's head dims allow
            (`sdpa_backends`), the blocks only the unfused math path takes (`math_only_layers`) and the GEMM widths
            that are not multiples of the tensor-core alignment (`unaligned_widths`); see `surgery/kernels.py`.
    """

    model_type = "compressed_vit"

    hidden_size: int = 768
    layers: list | None = None
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    use_distillation_token: bool = False
    distillation_head: bool = False
    source_model_type: str = "vit"
    kernel_support: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("num_hidden_layers", None)  # derived from `layers`; accepted for round trips
        self.layers = [self._validated_layer(index, layer) for index, layer in enumerate(self.layers or [])]
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"CompressedViTConfig.hidden_size must be a positive int, got {self.hidden_size!r}")
        if self.distillation_head and not self.use_distillation_token:
            raise ValueError("CompressedViTConfig.distillation_head=True needs use_distillation_token=True")
        super().__post_init__(**kwargs)

    @staticmethod
    def _validated_layer(index: int, layer: dict) -> dict:
        if not isinstance(layer, dict) or set(layer) != set(LAYER_FIELDS):
            missing = [key for key in LAYER_FIELDS if not isinstance(layer, dict) or key not in layer]
            unknown = sorted(set(layer) - set(LAYER_FIELDS)) if isinstance(layer, dict) else []
            raise ValueError(
                f"CompressedViTConfig.layers[{index}] must be a dict with exactly the keys {list(LAYER_FIELDS)} "
                f"(missing: {missing}, unknown: {unknown}), got {layer!r}"
            )
        for key in LAYER_FIELDS[:-1]:
            if not isinstance(layer[key], int) or layer[key] < 0:
                raise ValueError(f"CompressedViTConfig.layers[{index}].{key} must be an int >= 0, got {layer[key]!r}")
        if layer["num_heads"] > 0 and min(layer["qk_head_dim"], layer["v_head_dim"]) < 1:
            raise ValueError(
                f"CompressedViTConfig.layers[{index}]: a layer with heads needs qk_head_dim >= 1 and v_head_dim >= 1, "
                f"got {layer!r}"
            )
        if not float(layer["scaling"]) > 0:
            raise ValueError(f"CompressedViTConfig.layers[{index}].scaling must be > 0, got {layer['scaling']!r}")
        return {**layer, "scaling": float(layer["scaling"])}

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.use_distillation_token else 1


__all__ = ["CompressedViTConfig"]
