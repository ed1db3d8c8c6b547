"""``Linear``: ``nn.Linear`` whose few-row products use every CPU thread (batch-1 decoding).

Decoding one text at a time multiplies each weight matrix by a single row: a matrix-vector
product, bound by reading the weights from memory. PyTorch's CPU kernel for it (``F.linear``
on one row) runs on one thread, about 13 GB/s on this project's 2-core machine. Split into
``torch.get_num_threads()`` equal blocks of output rows and done as one batched product
(``torch.bmm``, which shares the blocks among the threads), the same dot products read the
weights at about 30-40 GB/s: fp32 batch-1 decoding ran 2.3x faster (benchmarks/README.md).
A few rows at once (prompt lookup checks 5 drafted tokens in one pass) gain the same way.

Each output is still one dot product of a weight row with the input, summed in another order,
so the values equal ``F.linear``'s up to float rounding (about 1e-6; tests/test_model.py bounds
it, and the greedy-parity tests with transformers and llama.cpp run through it). Everything
else (more rows, gradients, GPUs, bf16, one thread) is ``nn.Linear``'s own ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 7  # up to this many rows the split pays (1 row: 2.4x, 5 rows: 1.8x; 8: even)


def threaded_gemv(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """``x`` [rows, in] times ``weight`` [out, in] transposed, [rows, out]: the first ``parts``
    equal blocks of weight rows as one ``torch.bmm`` (a block per thread), any left over alone."""
    n_out, n_in = weight.shape
    even = n_out - n_out % parts
    # (x's columns shared by every block: stride 0 over the blocks, no copy)
    columns = x.T.expand(parts, n_in, x.shape[0])
    y = torch.bmm(weight[:even].view(parts, even // parts, n_in), columns).view(even, -1).T
    if even < n_out:
        y = torch.cat((y, F.linear(x, weight[even:])), dim=1)
    return y.contiguous()


class Linear(nn.Linear):
    """``nn.Linear``, with few-row products on the CPU shared among the threads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.get_num_threads()
        rows = x.numel() // self.in_features
        if (
            rows > FEW_ROWS  # (training, prompts, batches: PyTorch's kernel shares those)
            or rows == 0
            or parts < 2
            or x.device.type != "cpu"
            or self.weight.dtype != torch.float32  # (bf16's own kernel already shares the work)
            or torch.is_grad_enabled()
            or self.out_features < 64 * parts  # (too small to be worth sharing)
        ):
            return super().forward(x)
        y = threaded_gemv(x.reshape(rows, self.in_features), self.weight, parts)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
