"""Model surgery: what turns a Hugging Face ViT/DeiT into a gated one and back into a really smaller one.

- `targets`: the one place that names the transformers modules (attention projections, MLP, norms) a method touches.
- `architecture`: the kept widths per block (`Architecture`), the format every method ends in.
- `gating`, `residual_width`: masks applied to a dense model during a search (see docs/masking.md).
- `export`, `kernels`: slice the kept rows into a `CompressedViTForImageClassification`; which attention kernels
  its head dims allow.
- `flops`: exact MACs of a dense or compressed model, the unit of every budget.

Methods read these; nothing here imports a method, the trainer or publishing.
"""
