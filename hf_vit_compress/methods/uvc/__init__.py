"""UVC, "Unified Visual Transformer Compression" (pruning + block skipping under a primal-dual budget, distilled):
`config` (`UVCConfig`), `groups` (the pruned unit groups), `budget` (the differentiable MACs of the soft counts),
`projection` (rounding counts onto the budget), `hidden` (the residual width), `decisions` (the final
architecture), `method` (`UVCMethod`). Kept light: `config.py` is imported by `hf_vit_compress.config`, the rest
only when the method is built."""
