"""OFB, "Once for Both" (bi-mask importance and sparsity search with PMIM): `config` (`OFBConfig`), `modules`
(the candidate search space and its loss terms), `pmim` (the masked-image-modelling decoder), `method`
(`OFBMethod`). Kept light: `config.py` is imported by `hf_vit_compress.config`, the rest only when the method is
built."""
