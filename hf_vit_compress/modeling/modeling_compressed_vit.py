"""A ViT/DeiT image classifier whose blocks each have their own shapes (heads, q/k and v head dims, MLP width).

This file is shipped to the Hub next to the weights and loaded with `trust_remote_code=True`, so it imports only
torch and transformers. Module names mirror transformers' ViT (`vit.layers.N.attention.q_proj`, `mlp.fc1`, ...)
so the weights read like the dense model's.
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_compressed_vit import CompressedViTConfig


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, collections.abc.Iterable) else (value, value)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; the value head dim may differ from the query/key head dim."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@dataclass
class CompressedViTImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus DeiT's two heads when the model has them (logits are then their mean)."""

    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None


class CompressedViTEmbeddings(nn.Module):
    """Patch projection + class (and distillation) token + learned positions, at the kept hidden width."""

    def __init__(self, config: CompressedViTConfig):
        super().__init__()
        self.image_size = _pair(config.image_size)
        self.patch_size = _pair(config.patch_size)
        self.num_channels = config.num_channels
        num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, num_patches + config.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, num_channels, height, width = pixel_values.shape
        if num_channels != self.num_channels or (height, width) != self.image_size:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(pixel_values.shape)}"
            )
        patches = self.projection(pixel_values).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(batch_size, -1, -1)]
        if self.distillation_token is not None:
            prefix.append(self.distillation_token.expand(batch_size, -1, -1))
        embeddings = torch.cat([*prefix, patches], dim=1) + self.position_embeddings
        return self.dropout(embeddings)


class CompressedViTAttention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of `qk_head_dim` query/key and `v_head_dim` value channels."""

    def __init__(self, config: CompressedViTConfig, layer: dict):
        super().__init__()
        self.config = config
        self.num_heads = layer["num_heads"]
        self.qk_head_dim = layer["qk_head_dim"]
        self.v_head_dim = layer["v_head_dim"]
        # Stored, not derived: pruning head dims keeps the dense model's scale.
        self.scaling = layer["scaling"]
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        qk_width, v_width = self.num_heads * self.qk_head_dim, self.num_heads * self.v_head_dim
        self.q_proj = nn.Linear(config.hidden_size, qk_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, qk_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, v_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(v_width, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.num_heads == 0:  # every head was pruned: only the output bias remains
            # a fresh tensor, not a view of the parameter (tools such as FlopCounterMode expect a grad_fn)
            return torch.zeros_like(hidden_states) + self.o_proj.bias
        batch_size, seq_length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)

        # `get_interface(` (not `[...]`): transformers greps the source for it to allow `set_attn_implementation`.
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation or "eager", eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(batch_size, seq_length, -1))


class CompressedViTMLP(nn.Module):
    def __init__(self, config: CompressedViTConfig, layer: dict):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, layer["intermediate_size"])
        self.fc2 = nn.Linear(layer["intermediate_size"], config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CompressedViTLayer(nn.Module):
    """Pre-norm transformer block, exactly like `ViTLayer` but with this block's own shapes."""

    def __init__(self, config: CompressedViTConfig, layer: dict):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CompressedViTAttention(config, layer)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CompressedViTMLP(config, layer)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.attention(self.layernorm_before(hidden_states), **kwargs))
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class CompressedViTPreTrainedModel(PreTrainedModel):
    config_class = CompressedViTConfig
    config: CompressedViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CompressedViTEmbeddings", "CompressedViTLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _head_prefixes = ("classifier.", "cls_classifier.", "distillation_classifier.")

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        """Fail loudly when `config.json` and the weights disagree, naming every parameter (with both shapes).

        The config alone fixes every shape here, so by default transformers would re-initialise a block that the
        config added (missing keys) or drop one it removed (unexpected keys) with only a warning, and its
        size-mismatch error points at a logged report instead of naming the parameters. Head keys keep the usual
        warnings (re-heading is a normal use), and `ignore_mismatched_sizes=True` turns all of this off.
        """
        if not getattr(load_config, "ignore_mismatched_sizes", False):
            problems = [
                f"size mismatch for {name}: checkpoint has shape {tuple(ckpt_shape)}, the model built from "
                f"config.json has shape {tuple(model_shape)}"
                for name, ckpt_shape, model_shape in sorted(loading_info.mismatched_keys, key=lambda item: item[0])
            ]
            for kind, keys in (
                ("missing from", loading_info.missing_keys),
                ("unexpected in", loading_info.unexpected_keys),
            ):
                problems += [
                    f"{name} is {kind} the checkpoint for the blocks/embeddings described by config.json"
                    for name in sorted(keys)
                    if not name.startswith(model._head_prefixes)
                ]
            if problems:
                loading_info.error_msgs.append(
                    "config.json does not match the weights (it must describe the saved shapes exactly):\n\t"
                    + "\n\t".join(problems)
                )
        return PreTrainedModel._finalize_model_loading(model, load_config, loading_info)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CompressedViTEmbeddings):
            for parameter in (module.cls_token, module.distillation_token, module.position_embeddings):
                if parameter is not None:
                    nn.init.trunc_normal_(parameter, std=std)


class CompressedViTModel(CompressedViTPreTrainedModel):
    def __init__(self, config: CompressedViTConfig):
        super().__init__(config)
        self.embeddings = CompressedViTEmbeddings(config)
        self.layers = nn.ModuleList([CompressedViTLayer(config, layer) for layer in config.layers])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, **kwargs
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns the final-normed token states and, if asked, the input of every block plus the last output."""
        hidden_states = self.embeddings(pixel_values.to(self.embeddings.projection.weight.dtype))
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.layernorm(hidden_states)
        return hidden_states, tuple(all_hidden_states) if output_hidden_states else None


class CompressedViTForImageClassification(CompressedViTPreTrainedModel):
    """A structurally pruned ViT/DeiT image classifier (one or two linear heads on the prefix tokens)."""

    def __init__(self, config: CompressedViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = CompressedViTModel(config)
        if config.distillation_head:
            self.cls_classifier = nn.Linear(config.hidden_size, config.num_labels)
            self.distillation_classifier = nn.Linear(config.hidden_size, config.num_labels)
        else:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CompressedViTImageClassifierOutput:
        sequence_output, hidden_states = self.vit(pixel_values, output_hidden_states=bool(output_hidden_states))
        cls_logits = distillation_logits = None
        if self.config.distillation_head:
            cls_logits = self.cls_classifier(sequence_output[:, 0])
            distillation_logits = self.distillation_classifier(sequence_output[:, 1])
            logits = (cls_logits + distillation_logits) / 2
        else:
            logits = self.classifier(sequence_output[:, 0])
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return CompressedViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
        )


__all__ = [
    "CompressedViTForImageClassification",
    "CompressedViTModel",
    "CompressedViTPreTrainedModel",
]
