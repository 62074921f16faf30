"""Which fused attention kernels and tensor-core-friendly GEMMs a compressed model's shapes allow.

`scaled_dot_product_attention` (sdpa) on a CUDA GPU runs one of four backends, chosen per call from the shapes and
dtype of q, k, v; a pruned head dim can rule out every fused one and leave the unfused math path, which
materialises the (tokens x tokens) attention matrix per head and was measured to make compressed models slower than
the dense one (UVC exports with value head dims like 21 on an H200). The rules below restate PyTorch's own checks
(`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp` and `attention.cpp` as of pytorch/pytorch main at 001f694,
newer than torch 2.13; other versions may differ, which `cross_check_sdpa` shows on a GPU) for GPUs of compute
capability 8.0 to 12.1 (A100, H100, H200, ...), dense inputs laid out as this package's attention lays them out, no
attention mask, no dropout, inference:

* ``flash``: float16/bfloat16 only; the q, k and v head dims must all be EQUAL and at most 256. A head dim that is
  not a multiple of 8 is accepted but padded to one by sdpa (extra copies, padded MACs).
* ``efficient`` (memory-efficient, CUTLASS): q and k head dims equal; the q/k head dim and the v head dim each a
  multiple of the GEMM alignment: 8 for 16-bit dtypes (128 bits per tensor-core load), 4 for float32. The v head dim
  may differ from the q/k one.
* ``cudnn``: float16/bfloat16 only; the q/k and v head dims each a multiple of 8 and at most 128 (PyTorch allows
  256 on sm90/sm100 with cuDNN newer than 9.22; 128 is what every supported setup takes, training backward
  included). The v head dim may differ.
* ``math``: always.

The same 16-byte alignment makes bf16/fp16 cuBLAS GEMMs use tensor cores at full efficiency, so every width that is
a GEMM dimension (residual width, q/k and v widths, MLP width) is checked against it too. These are pure functions of
the shapes and the dtype (they run on CPU); `cross_check_sdpa` compares them with what torch itself says on a GPU
(`torch.backends.cuda.can_use_flash_attention` etc., whose `debug=True` gives the reasons). Written by hand: no
library exposes PyTorch's sdpa dispatch rules without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable

import torch

BACKENDS = ("flash", "efficient", "cudnn", "math")
FUSED_BACKENDS = BACKENDS[:3]
REPORT_DTYPES = ("bfloat16", "float32")  # float16 follows the same rules as bfloat16
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype or its name, got {dtype!r}")
    return resolved


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def gemm_alignment(dtype: torch.dtype | str) -> int:
    """Elements per 16 bytes: the width multiple that tensor-core GEMMs and the memory-efficient kernel want (8 for
    float16/bfloat16, 4 for float32)."""
    return max(1, 16 // _dtype(dtype).itemsize)


def sdpa_backend_reasons(qk_head_dim: int, v_head_dim: int, dtype: torch.dtype | str) -> dict[str, str | None]:
    """For each sdpa backend, None if a layer with these head dims may run it in `dtype`, else the reason why not
    (see the module docstring for the rules and their source)."""
    dtype = _dtype(dtype)
    name = str(dtype).removeprefix("torch.")
    align = gemm_alignment(dtype)
    reasons: dict[str, str | None] = {}
    if not _is_16bit(dtype):
        reasons["flash"] = f"needs float16/bfloat16, not {name}"
    elif qk_head_dim != v_head_dim:
        reasons["flash"] = f"needs equal q/k and v head dims, got {qk_head_dim} and {v_head_dim}"
    elif qk_head_dim > FLASH_MAX_HEAD_DIM:
        reasons["flash"] = f"needs head dims <= {FLASH_MAX_HEAD_DIM}, got {qk_head_dim}"
    else:
        reasons["flash"] = None
    odd = [f"{label} {dim}" for label, dim in (("q/k", qk_head_dim), ("v", v_head_dim)) if dim % align]
    reasons["efficient"] = f"needs head dims that are multiples of {align} in {name}, got {', '.join(odd)}" if odd \
        else None
    if not _is_16bit(dtype):
        reasons["cudnn"] = f"needs float16/bfloat16, not {name}"
    elif qk_head_dim % 8 or v_head_dim % 8:
        reasons["cudnn"] = f"needs head dims that are multiples of 8, got q/k {qk_head_dim}, v {v_head_dim}"
    elif max(qk_head_dim, v_head_dim) > CUDNN_MAX_HEAD_DIM:
        reasons["cudnn"] = f"needs head dims <= {CUDNN_MAX_HEAD_DIM}, got q/k {qk_head_dim}, v {v_head_dim}"
    else:
        reasons["cudnn"] = None
    reasons["math"] = None
    return reasons


def _layer_widths(index: int, layer: dict) -> dict[str, int]:
    heads = layer["num_heads"]
    return {
        f"layers[{index}].qk_head_dim": layer["qk_head_dim"] if heads else 0,
        f"layers[{index}].v_head_dim": layer["v_head_dim"] if heads else 0,
        f"layers[{index}].intermediate_size": layer["intermediate_size"],
    }


def kernel_report(config, dtypes: Iterable[str] = REPORT_DTYPES) -> dict:
    """What the shapes of a `CompressedViTConfig` allow, per dtype name.

    Returns:
        `{dtype: {"sdpa_backends": backends every layer with heads may run (math always), "math_only_layers":
        indices of layers that no fused backend takes, "unaligned_widths": GEMM widths that are not a multiple of
        `gemm_alignment(dtype)`, "layers": per layer {"index", "num_heads", "qk_head_dim", "v_head_dim",
        "sdpa": {backend: None or the reason}}}}`.
    """
    report = {}
    for dtype in dtypes:
        align = gemm_alignment(dtype)
        layers, allowed, math_only = [], set(BACKENDS), []
        widths = {"hidden_size": config.hidden_size}
        for index, layer in enumerate(config.layers):
            widths.update(_layer_widths(index, layer))
            if not layer["num_heads"]:
                continue  # no attention runs in this block
            reasons = sdpa_backend_reasons(layer["qk_head_dim"], layer["v_head_dim"], dtype)
            layers.append({"index": index, "num_heads": layer["num_heads"], "qk_head_dim": layer["qk_head_dim"],
                           "v_head_dim": layer["v_head_dim"], "sdpa": reasons})
            allowed &= {backend for backend, reason in reasons.items() if reason is None}
            if all(reasons[backend] is not None for backend in FUSED_BACKENDS):
                math_only.append(index)
        report[dtype] = {
            "sdpa_backends": [backend for backend in BACKENDS if backend in allowed],
            "math_only_layers": math_only,
            "unaligned_widths": [f"{name}={width}" for name, width in widths.items() if width % align],
            "layers": layers,
        }
    return report


def kernel_summary(report: dict) -> dict:
    """`kernel_report` without the per-layer details: what `CompressedViTConfig.kernel_support` stores."""
    return {dtype: {key: value for key, value in entry.items() if key != "layers"} for dtype, entry in report.items()}


def math_fallback_warning(report: dict) -> str | None:
    """A one-paragraph warning when some layer can only run sdpa's math fallback in some dtype, else None."""
    lines = []
    for dtype, entry in report.items():
        for layer in entry["layers"]:
            if layer["index"] in entry["math_only_layers"]:
                why = "; ".join(f"{backend}: {layer['sdpa'][backend]}" for backend in FUSED_BACKENDS)
                lines.append(f"{dtype} layer {layer['index']} (q/k head dim {layer['qk_head_dim']}, v head dim "
                             f"{layer['v_head_dim']}): {why}")
    if not lines:
        return None
    return ("these head dims force scaled_dot_product_attention's unfused math fallback on CUDA GPUs (slow; "
            "multiples of 8 avoid it, e.g. UVCConfig.channel_multiple=8):\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# What torch itself says (needs a CUDA device to mean anything)
# ---------------------------------------------------------------------------------------------------------------

_TORCH_CHECKS = {
    "flash": "can_use_flash_attention",
    "efficient": "can_use_efficient_attention",
    "cudnn": "can_use_cudnn_attention",
}
#: values of torch's SDPBackend enum, as `torch._fused_sdp_choice` returns them
_CHOICE_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}


def _num_patches(image_size, patch_size) -> int:
    def pair(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    (height, width), (patch_height, patch_width) = pair(image_size), pair(patch_size)
    return (height // patch_height) * (width // patch_width)


@contextlib.contextmanager
def _collected_messages():
    """Collect Python warnings and what native code writes to file descriptor 2: torch's `debug=True` reasons are
    C++ warnings, which reach Python's warnings or plain stderr depending on how the binding was made."""
    messages: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            native = sink.read().decode(errors="replace").strip()
            messages.extend(str(warning.message) for warning in caught)
            if native:
                messages.append(" ".join(native.split()))


def _sdpa_params(query, key, value):
    params = torch.backends.cuda.SDPAParams
    try:
        return params(query, key, value, None, 0.0, False, False)  # torch >= 2.5: enable_gqa
    except TypeError:
        return params(query, key, value, None, 0.0, False)


def torch_sdpa_verdicts(num_heads: int, qk_head_dim: int, v_head_dim: int, tokens: int, dtype: torch.dtype | str,
                        device: str | torch.device = "cuda", batch_size: int = 2) -> dict:
    """What torch says for q/k/v laid out as the compressed model's attention lays them out: per backend
    `{"allowed": bool or None (torch has no such check), "reason": the debug warnings}` and `"selected"`, the
    backend sdpa would pick (`torch._fused_sdp_choice`, if present)."""
    dtype = _dtype(dtype)

    def projected(head_dim: int) -> torch.Tensor:  # (B, S, H*d) viewed as (B, H, S, d), like the modeling file
        flat = torch.zeros(batch_size, tokens, num_heads * head_dim, device=device, dtype=dtype)
        return flat.view(batch_size, tokens, num_heads, head_dim).transpose(1, 2)

    query, key, value = projected(qk_head_dim), projected(qk_head_dim), projected(v_head_dim)
    params = _sdpa_params(query, key, value)
    verdicts = {}
    for backend, function_name in _TORCH_CHECKS.items():
        check = getattr(torch.backends.cuda, function_name, None)
        if check is None:
            verdicts[backend] = {"allowed": None, "reason": f"torch {torch.__version__} has no {function_name}"}
            continue
        with _collected_messages() as messages:
            allowed = bool(check(params, True))
        verdicts[backend] = {"allowed": allowed, "reason": " ".join(messages) or None}
    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is not None:
        try:
            verdicts["selected"] = _CHOICE_NAMES.get(int(choice(query, key, value)), "unknown")
        except RuntimeError as error:  # no backend at all
            verdicts["selected"] = f"error: {error}"
    return verdicts


def cross_check_sdpa(config, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cuda") -> dict:
    """Compare `kernel_report`'s prediction with torch's own checks for every distinct attention shape of a
    `CompressedViTConfig` on `device` (see `cross_check_shapes`)."""
    shapes = [(layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"]) for layer in config.layers]
    tokens = _num_patches(config.image_size, config.patch_size) + config.num_prefix_tokens
    return cross_check_shapes(shapes, tokens, dtype, device)


def cross_check_shapes(shapes: Iterable[tuple[int, int, int]], tokens: int, dtype: torch.dtype | str = torch.bfloat16,
                       device: str | torch.device = "cuda") -> dict:
    """Compare `sdpa_backend_reasons` with torch's own checks for every distinct (num_heads, qk_head_dim,
    v_head_dim) with heads. Returns `{"device", "torch", "dtype", "tokens", "shapes": [{num_heads, qk_head_dim,
    v_head_dim, "predicted": backends allowed, "torch": torch_sdpa_verdicts(...)}], "mismatches": ["<shape>
    <backend>: predicted X, torch Y (reason)"]}`. On a non-CUDA device torch rejects every fused backend, so only a
    CUDA run says anything about the prediction."""
    dtype = _dtype(dtype)
    device = torch.device(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "shapes": [],
              "mismatches": []}
    for heads, qk, v in sorted({shape for shape in shapes if shape[0]}):
        predicted = sdpa_backend_reasons(qk, v, dtype)
        verdicts = torch_sdpa_verdicts(heads, qk, v, tokens, dtype, device)
        result["shapes"].append({"num_heads": heads, "qk_head_dim": qk, "v_head_dim": v,
                                 "predicted": [b for b in BACKENDS if predicted[b] is None], "torch": verdicts})
        for backend in FUSED_BACKENDS:
            said = verdicts[backend]["allowed"]
            if said is not None and said != (predicted[backend] is None):
                result["mismatches"].append(
                    f"{heads}h q/k {qk} v {v} {backend}: predicted {predicted[backend] is None}, torch {said} "
                    f"({verdicts[backend]['reason'] or predicted[backend]})")
    return result
