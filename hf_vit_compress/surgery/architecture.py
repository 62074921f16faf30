"""`Architecture`: which units of a dense ViT/DeiT survive compression.

Every method's `decide()` ends with one of these; `export.py` slices weights by it and `flops.py` counts it. Units
are numbered as in the dense model: head h owns q/k/v output channels `h * head_dim + c`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerArchitecture:
    """The kept units of one dense block.

    Args:
        heads: kept head indices, ascending.
        qk_channels: for each kept head (same order), the kept query/key channels inside that head. Every kept head
            keeps the same number of channels (the compressed format has one qk head dim per layer).
        v_channels: likewise for value channels.
        mlp_neurons: kept fc1 outputs (= fc2 inputs), ascending.
        keep_block: False removes the whole block (its output becomes its input).
        qk_scale: optional `(num_heads * head_dim,)` multipliers of the q AND k outputs, folded into q_proj/k_proj.
        v_scale: optional `(num_heads * head_dim,)` multipliers of the v outputs, folded into v_proj.
        mlp_scale: optional `(intermediate_size,)` multipliers of fc1's outputs (before the activation).
        pad_head_dims: export the narrower of the q/k and v head dims zero-padded to the wider, so that both are
            equal: the same outputs (zero q/k channels add nothing to a score, zero v channels meet zero o_proj
            columns), and sdpa's fused kernel, which needs equal head dims, can run the block. Set by a speed
            budget where its latency table says the padded block is faster (`cost.BudgetCost.with_padding`).
    """

    heads: list[int]
    qk_channels: list[list[int]]
    v_channels: list[list[int]]
    mlp_neurons: list[int]
    keep_block: bool = True
    qk_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None
    pad_head_dims: bool = False

    def __post_init__(self):
        for name in ("qk_channels", "v_channels"):
            per_head = getattr(self, name)
            if len(per_head) != len(self.heads):
                raise ValueError(
                    f"{name} needs one channel list per kept head ({len(self.heads)}), got {len(per_head)}"
                )
            if len({len(channels) for channels in per_head}) > 1:
                raise ValueError(f"{name}: every kept head must keep the same number of channels")

    @property
    def num_heads(self) -> int:
        return len(self.heads) if self.keep_block else 0

    @property
    def qk_head_dim(self) -> int:
        return len(self.qk_channels[0]) if self.num_heads else 0

    @property
    def v_head_dim(self) -> int:
        return len(self.v_channels[0]) if self.num_heads else 0

    @property
    def intermediate_size(self) -> int:
        return len(self.mlp_neurons) if self.keep_block else 0

    @property
    def exported_head_dims(self) -> tuple[int, int]:
        """(q/k, v) head dims of the exported block: the kept ones, or both the wider one with `pad_head_dims`."""
        if self.pad_head_dims:
            wider = max(self.qk_head_dim, self.v_head_dim)
            return wider, wider
        return self.qk_head_dim, self.v_head_dim

    def flat_indices(self, head_dim: int, which: str) -> list[int]:
        """Kept q/k (`which="qk"`) or v (`which="v"`) output channels as flat indices into the dense projection."""
        per_head = self.qk_channels if which == "qk" else self.v_channels
        return [head * head_dim + channel for head, channels in zip(self.heads, per_head) for channel in channels]

    def summary(self) -> dict:
        return {
            "keep_block": self.keep_block,
            "num_heads": self.num_heads,
            "qk_head_dim": self.qk_head_dim,
            "v_head_dim": self.v_head_dim,
            "intermediate_size": self.intermediate_size,
            **({"pad_head_dims": True} if self.pad_head_dims else {}),
        }


@dataclass
class Architecture:
    """The kept units of a whole model.

    Args:
        layers: one `LayerArchitecture` per dense block (removed blocks have `keep_block=False`).
        hidden_channels: kept residual-stream channels, ascending (shared by every block).
        hidden_scale: optional `(hidden_size,)` multipliers of the embedding output (patch tokens, class and
            distillation tokens, positions), folded into the embeddings.
    """

    layers: list[LayerArchitecture]
    hidden_channels: list[int]
    hidden_scale: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    @classmethod
    def full(cls, num_layers: int, num_heads: int, head_dim: int, intermediate_size: int, hidden_size: int):
        """The architecture that keeps everything (the dense model)."""
        all_channels = list(range(head_dim))
        return cls(
            layers=[
                LayerArchitecture(
                    heads=list(range(num_heads)),
                    qk_channels=[all_channels] * num_heads,
                    v_channels=[all_channels] * num_heads,
                    mlp_neurons=list(range(intermediate_size)),
                )
                for _ in range(num_layers)
            ],
            hidden_channels=list(range(hidden_size)),
        )

    @property
    def kept_layers(self) -> list[LayerArchitecture]:
        return [layer for layer in self.layers if layer.keep_block]

    def summary(self) -> dict:
        """JSON-friendly shapes (no indices): what a report shows."""
        return {"hidden_size": len(self.hidden_channels), "layers": [layer.summary() for layer in self.layers]}

    def to_dict(self) -> dict:
        """JSON-friendly full description (indices included, scales left out)."""
        return {
            "hidden_channels": list(self.hidden_channels),
            "layers": [
                {
                    "keep_block": layer.keep_block,
                    "heads": list(layer.heads),
                    "qk_channels": [list(c) for c in layer.qk_channels],
                    "v_channels": [list(c) for c in layer.v_channels],
                    "mlp_neurons": list(layer.mlp_neurons),
                    # only when set, so that a MACs run's file is as it always was
                    **({"pad_head_dims": True} if layer.pad_head_dims else {}),
                }
                for layer in self.layers
            ],
        }

    def validate(self, dense_config, num_blocks: int | None = None) -> None:
        """Raise a ValueError naming the field if this architecture does not fit the dense model `dense_config`
        (`ViTConfig`/`DeiTConfig`): wrong number of layers, indices out of range or repeated, wrong scale shapes."""
        head_dim = dense_config.hidden_size // dense_config.num_attention_heads
        width = dense_config.num_attention_heads * head_dim
        num_blocks = dense_config.num_hidden_layers if num_blocks is None else num_blocks
        if len(self.layers) != num_blocks:
            raise ValueError(
                f"architecture.layers has {len(self.layers)} entries but the model has {num_blocks} blocks"
            )
        _check_units("hidden_channels", self.hidden_channels, dense_config.hidden_size, allow_empty=False)
        _check_scale("hidden_scale", self.hidden_scale, dense_config.hidden_size)
        for index, layer in enumerate(self.layers):
            _check_scale(f"layers[{index}].qk_scale", layer.qk_scale, width)
            _check_scale(f"layers[{index}].v_scale", layer.v_scale, width)
            _check_scale(f"layers[{index}].mlp_scale", layer.mlp_scale, dense_config.intermediate_size)
            _check_units(f"layers[{index}].heads", layer.heads, dense_config.num_attention_heads)
            _check_units(f"layers[{index}].mlp_neurons", layer.mlp_neurons, dense_config.intermediate_size)
            for name in ("qk_channels", "v_channels"):
                for head, channels in zip(layer.heads, getattr(layer, name)):
                    _check_units(f"layers[{index}].{name} (head {head})", channels, head_dim, allow_empty=False)

    def same_units(self, other: "Architecture") -> bool:
        """True when both keep exactly the same units (scales are ignored)."""
        return self.to_dict() == other.to_dict()


def _check_scale(name: str, scale: torch.Tensor | None, size: int) -> None:
    if scale is not None and tuple(scale.shape) != (size,):
        raise ValueError(
            f"architecture.{name} must have shape ({size},) (one entry per dense unit), got {tuple(scale.shape)}"
        )


def _check_units(name: str, units: list[int], size: int, allow_empty: bool = True) -> None:
    if (not units and not allow_empty) or len(set(units)) != len(units) or any(not 0 <= u < size for u in units):
        raise ValueError(
            f"architecture.{name} must be distinct indices in [0, {size})"
            f"{'' if allow_empty else ' (at least one)'}, got {list(units)[:16]}{'...' if len(units) > 16 else ''}"
        )
