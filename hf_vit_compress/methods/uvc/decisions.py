"""UVC's decisions: the hard architecture of the search's counts and skip-gate logits, projected to the budget
(`projection.py`), and the final architecture kept in the method's buffers so that a reload reproduces it.

`UVCDecisions` is the part of `UVCMethod` that decides (a mixin: it reads the method's geometry, counts, least-k
sets, skip-gate logits and final-architecture buffers).
"""

from __future__ import annotations

from typing import Any

import torch

from ...surgery.architecture import Architecture, LayerArchitecture
from .projection import ProjectionHidden, ProjectionLayer, project_and_round, query_key_channels


class UVCDecisions:
    """`decide()` and `finalize()` for `UVCMethod`.

    The contract with the class it is mixed into: the attributes annotated below, plus the methods
    `architecture_macs(architecture)` and `architecture_cost(architecture)` (`CompressionMethod`), `hard_ratio()`
    (`UVCBudget`) and `_groups()` (`UVCMethod`: the current least-k sets).
    """

    # -- provided by UVCMethod / CompressionMethod ------------------------------------------------------------
    config: Any  # CompressionConfig
    geometry: Any  # surgery.flops.Geometry
    name: str
    target_macs: float
    dense_macs: int
    cost: Any  # surgery.cost.BudgetCost: what the budget is counted in
    target_cost: float
    prune_hidden: bool
    theta: torch.Tensor  # (L, 2) skip / run logits
    final_heads: torch.Tensor  # the final architecture's keep buffers (empty until finalize())
    final_vdims: torch.Tensor
    final_mlp: torch.Tensor
    final_hidden: torch.Tensor
    final_blocks: torch.Tensor
    _finalized: bool

    def decide(self) -> Architecture:
        """The hard architecture of the current counts and theta, projected to `architecture_macs <= target`.

        After `finalize()` (also after a reload), the stored final architecture.
        """
        if self._finalized:
            return self._stored_architecture()
        geo = self.geometry
        with torch.no_grad():
            keep_blocks = (self.theta[:, 1] > self.theta[:, 0]).tolist()
            if geo.num_layers and not any(keep_blocks):
                keep_blocks[int(torch.argmax(self.theta[:, 1] - self.theta[:, 0]))] = True
            groups = self._groups()
            layers = [ProjectionLayer.from_groups(groups.layer(i), keep) for i, keep in enumerate(keep_blocks)]
            for layer in layers:
                layer.shared_head_dims = self.config.uvc.shared_head_dims
            hidden = None
            if self.prune_hidden:
                hidden = ProjectionHidden.from_sets(groups.hidden.scores, groups.hidden.removed)
        removed, rounded = project_and_round(layers, self.cost, self.target_cost, self.config.uvc.channel_multiple,
                                             hidden)
        # a speed budget exports unequal head dims zero-padded where its table prices them so (never under MACs)
        architecture = self.cost.with_padding(Architecture(
            layers=[layer.to_layer_architecture(geo.head_dim) for layer in layers],
            hidden_channels=hidden.channels() if hidden is not None else list(range(geo.hidden_size)),
        ))
        price = self.architecture_cost(architecture)
        if not self.cost.within(price, self.target_cost):  # cannot happen: the projection prices the same way
            raise RuntimeError(f"UVC final projection failed: {price} {self.cost.unit} > target "
                               f"{self.target_cost:.6g}")
        macs = self.architecture_macs(architecture)
        architecture.metadata.update(
            method=self.name, macs=macs, ratio=macs / self.dense_macs, target_macs=float(self.target_macs),
            hard_ratio=self.hard_ratio(), projection_removals=removed, rounding_removals=rounded,
        )
        if self.cost.kind != "macs":
            architecture.metadata.update(predicted_ms=price, target_ms=float(self.target_cost))
        return architecture

    def finalize(self) -> Architecture:
        architecture = super().finalize()
        self._store_architecture(architecture)
        return architecture

    @torch.no_grad()
    def _store_architecture(self, architecture: Architecture) -> None:
        head_dim = self.geometry.head_dim
        self.final_blocks.zero_()
        self.final_heads.zero_()
        self.final_vdims.zero_()
        self.final_mlp.zero_()
        if self.prune_hidden:
            self.final_hidden.zero_()
            self.final_hidden[architecture.hidden_channels] = True
        for index, layer in enumerate(architecture.layers):
            if not layer.keep_block:
                continue
            self.final_blocks[index] = True
            self.final_heads[index, layer.heads] = True
            self.final_vdims[index, layer.flat_indices(head_dim, "v")] = True
            self.final_mlp[index, layer.mlp_neurons] = True

    def _stored_architecture(self) -> Architecture:
        geo = self.geometry
        layers = []
        for index in range(geo.num_layers):
            if not bool(self.final_blocks[index]):
                layers.append(LayerArchitecture([], [], [], [], keep_block=False))
                continue
            heads = self.final_heads[index].nonzero().flatten().tolist()
            vdims = self.final_vdims[index].view(geo.num_heads, geo.head_dim)
            v_channels = [vdims[h].nonzero().flatten().tolist() for h in heads]
            layers.append(LayerArchitecture(
                heads=heads,
                qk_channels=query_key_channels(v_channels, geo.head_dim, self.config.uvc.shared_head_dims),
                v_channels=v_channels,
                mlp_neurons=self.final_mlp[index].nonzero().flatten().tolist(),
            ))
        hidden = self.final_hidden.nonzero().flatten().tolist() if self.prune_hidden else range(geo.hidden_size)
        architecture = self.cost.with_padding(Architecture(layers=layers, hidden_channels=list(hidden)))
        macs = self.architecture_macs(architecture)
        architecture.metadata.update(method=self.name, macs=macs, ratio=macs / self.dense_macs,
                                     target_macs=float(self.target_macs))
        return architecture
