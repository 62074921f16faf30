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
    """

    heads: list[int]
    qk_channels: list[list[int]]
    v_channels: list[list[int]]
    mlp_neurons: list[int]
    keep_block: bool = True
    qk_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("qk_channels", "v_channels"):
            per_head = getattr(self, name)
            if len(per_head) != len(self.heads):
                raise ValueError(f"{name} needs one channel list per kept head ({len(self.heads)}), got {len(per_head)}")
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
                }
                for layer in self.layers
            ],
        }

    def same_units(self, other: "Architecture") -> bool:
        """True when both keep exactly the same units (scales are ignored)."""
        return self.to_dict() == other.to_dict()
