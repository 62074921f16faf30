"""Progressive masked image modelling (PMIM, docs/methods.md): a SimMIM-style auxiliary task during the OFB search.

Patch tokens (after the position embedding is added) are replaced by a learnable mask token at a ratio that grows
during warm-up; a 1x1 conv + pixel-shuffle decoder reconstructs the locally normalised image from the final-normed
patch tokens, and the L1 loss is taken on masked pixels only.
"""

from __future__ import annotations

import collections.abc

import torch
from torch import nn
from torch.nn import functional as F

from ...surgery.targets import ModelParts


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, collections.abc.Iterable) else (value, value)


def local_window(image_size: int, window_at_224: int = 47) -> int:
    """The local-normalisation window scaled from 224 px to `image_size`, odd and at least 1."""
    window = max(1, round(window_at_224 * image_size / 224))
    return window if window % 2 == 1 else window + 1


def locally_normalize(images: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """(x - local mean) / sqrt(local variance + eps), per channel, over a `window` x `window` neighbourhood (clipped
    at the borders)."""
    mean = _box_mean(images, window)
    mean_of_squares = _box_mean(images * images, window)
    variance = (mean_of_squares - mean * mean).clamp_min(0)
    return (images - mean) / torch.sqrt(variance + eps)


def _box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window box clipped at the borders, as two 1-D passes (the clipped box is a product of
    row and column ranges, so the 2-D mean factorises): O(2k) instead of O(k^2) per pixel."""
    pad = window // 2
    rows = F.avg_pool2d(images, kernel_size=(window, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    return F.avg_pool2d(rows, kernel_size=(1, window), stride=1, padding=(0, pad), count_include_pad=False)


def random_token_mask(batch_size: int, num_patches: int, mask_ratio: float, device) -> torch.Tensor:
    """(batch, num_patches) bool: exactly round(mask_ratio * num_patches) random patches per sample."""
    num_masked = int(round(mask_ratio * num_patches))
    order = torch.rand(batch_size, num_patches, device=device).argsort(dim=1)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask


class PMIM(nn.Module):
    """Mask token + decoder; once `install`ed, hooks into the model to mask patch tokens and capture the final
    token states.

    Args:
        parts: the model's `ModelParts`.
        window_at_224: local-normalisation window at 224 px.
    """

    def __init__(self, parts: ModelParts, window_at_224: int = 47):
        super().__init__()
        config = parts.backbone.config
        self.patch_size = _pair(config.patch_size)
        self.image_size = _pair(config.image_size)
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_prefix_tokens = parts.num_prefix_tokens
        self.num_channels = config.num_channels
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"PMIM needs square patches, got patch_size={config.patch_size}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        patch = self.patch_size[0]
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, patch * patch * config.num_channels, kernel_size=1), nn.PixelShuffle(patch)
        )
        self.window = local_window(self.image_size[0], window_at_224)
        self.mask_ratio = 0.0
        self.active = True
        self._token_mask: torch.Tensor | None = None
        self._last_hidden: torch.Tensor | None = None
        self.__dict__["_hooks"] = []

    def install(self, parts: ModelParts) -> None:
        """Hook into the model: mask patch tokens in the embeddings' output, capture the final token states."""
        if self._hooks:
            return
        self._hooks.extend([
            # prepend: replace tokens before the embedding gate scales them (the mask token is gated too)
            parts.embeddings.register_forward_hook(self._mask_tokens, prepend=True),
            parts.backbone.register_forward_hook(self._capture_hidden),
        ])

    def _mask_tokens(self, module, args, embeddings):
        self._token_mask = None
        # The MODEL's mode (the hooked embeddings module), not this module's: a method attached to a model that is
        # already in eval mode (as from_pretrained returns it) is itself still in training mode until the next
        # model.train()/eval(), and would otherwise mask tokens at inference.
        if not (self.active and module.training and self.mask_ratio > 0):
            return embeddings
        batch_size, num_tokens, _ = embeddings.shape
        num_patches = num_tokens - self.num_prefix_tokens
        mask = random_token_mask(batch_size, num_patches, self.mask_ratio, embeddings.device)
        self._token_mask = mask
        patch_tokens = embeddings[:, self.num_prefix_tokens :]
        weight = mask.unsqueeze(-1).to(embeddings.dtype)
        patch_tokens = patch_tokens * (1 - weight) + self.mask_token.to(embeddings.dtype) * weight
        return torch.cat([embeddings[:, : self.num_prefix_tokens], patch_tokens], dim=1)

    def _capture_hidden(self, module, args, output):
        self._last_hidden = output.last_hidden_state if self._token_mask is not None else None

    def reconstruction_loss(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """L1 between the decoded image and the locally normalised input, on masked pixels, per channel.

        Returns None when the last forward masked nothing (eval, PMIM off, or ratio 0).
        """
        if self._token_mask is None or self._last_hidden is None:
            return None
        tokens = self._last_hidden[:, self.num_prefix_tokens :]
        batch_size, num_patches, hidden = tokens.shape
        feature_map = tokens.transpose(1, 2).reshape(batch_size, hidden, *self.grid)
        reconstruction = self.decoder(feature_map.to(self.decoder[0].weight.dtype)).float()
        # An image size that is not a multiple of the patch (30 px, patch 8): the patch embedding never sees the
        # last rows/columns, so only the covered area is reconstructed.
        covered = (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])
        target = locally_normalize(pixel_values.float(), self.window)[..., : covered[0], : covered[1]]
        pixel_mask = (
            self._token_mask.reshape(batch_size, 1, *self.grid)
            .repeat_interleave(self.patch_size[0], dim=2)
            .repeat_interleave(self.patch_size[1], dim=3)
            .float()
        )
        error = (reconstruction - target).abs() * pixel_mask
        self._token_mask = self._last_hidden = None
        return error.sum() / (pixel_mask.sum() * 1.0 + 1e-5) / self.num_channels

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
