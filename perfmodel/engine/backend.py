"""Array backends: the few primitives the transformer needs, for NumPy and for PyTorch.

The model is written once against this interface, so the two backends cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np

from perfmodel.errors import bad_value

BACKENDS = ("numpy", "torch")


class NumpyBackend:
    name = "numpy"
    dtype_name = "fp32"

    def __init__(self, dtype: str = "fp32"):
        if dtype != "fp32":
            raise bad_value("--dtype", dtype, "fp32 (the numpy backend); bf16 needs --backend torch")
        self.dtype = np.float32

    def asarray(self, a):
        return np.ascontiguousarray(np.asarray(a, dtype=self.dtype))

    def index_array(self, a):
        return np.asarray(a, dtype=np.int64)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def zeros(self, shape):
        return np.zeros(shape, dtype=self.dtype)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def transpose(self, x, axes):
        return np.transpose(x, axes)

    def swap_last(self, x):
        return np.swapaxes(x, -1, -2)

    def rsqrt_mean_square(self, x, eps):
        return 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def layernorm(self, x, w, b, eps):
        mu = x.mean(axis=-1, keepdims=True)
        d = x - mu
        return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + eps) * w + b

    def silu(self, x):
        return x / (1.0 + np.exp(-x))

    def gelu(self, x):  # tanh approximation, as GPT-2 and Gemma use
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))

    def masked_softmax(self, s, mask):
        """In place on the fresh score block: no extra full-size temporaries beyond the broadcast mask."""
        np.copyto(s, -np.inf, where=~np.broadcast_to(mask, s.shape))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s

    def softmax(self, s):
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=-1, keepdims=True)

    def topk(self, x, k):
        idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, idx, axis=-1), idx

    def take(self, table, ids):
        return table[ids]

    def gather_nbytes(self, table, rows) -> int:
        """Bytes read from `table` to gather `rows` (a quantised table reads its codes and scales)."""
        return self.nbytes(rows)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def sync(self) -> None:
        pass


class TorchBackend:
    name = "torch"

    def __init__(self, dtype: str = "fp32", device: str = "cpu"):
        import torch

        self.torch = torch
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise bad_value("--dtype", dtype, "|".join(dtypes))
        self.dtype = dtypes[dtype]
        self.dtype_name = dtype
        self.device = torch.device(device)

    def asarray(self, a):
        t = self.torch
        if isinstance(a, t.Tensor):
            return a.to(self.device, self.dtype).contiguous()
        return t.as_tensor(np.asarray(a, dtype=np.float32)).to(self.device, self.dtype).contiguous()

    def index_array(self, a):
        return self.torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def nbytes(self, x) -> int:
        return int(x.numel() * x.element_size())

    def matmul(self, a, b):
        return self.torch.matmul(a, b)

    def transpose(self, x, axes):
        return x.permute(*axes)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def rsqrt_mean_square(self, x, eps):
        return self.torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)

    def layernorm(self, x, w, b, eps):
        return self.torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)

    def silu(self, x):
        return self.torch.nn.functional.silu(x)

    def gelu(self, x):
        return self.torch.nn.functional.gelu(x, approximate="tanh")

    def masked_softmax(self, s, mask):
        return self.torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)

    def softmax(self, s):
        return self.torch.softmax(s, dim=-1)

    def topk(self, x, k):
        v, i = self.torch.topk(x, k, dim=-1)
        return v, i

    def take(self, table, ids):
        return table[ids]

    def gather_nbytes(self, table, rows) -> int:
        """Bytes read from `table` to gather `rows` (a quantised table reads its codes and scales)."""
        return self.nbytes(rows)

    def concat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def sdpa(self, q, k, v, mask, gqa: bool):
        return self.torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                  enable_gqa=gqa, scale=1.0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def make_backend(name: str, dtype: str = "fp32", device: str = "cpu"):
    if name == "numpy":
        return NumpyBackend(dtype)
    if name == "torch":
        try:
            return TorchBackend(dtype, device)
        except ImportError:
            from perfmodel.errors import PerfmodelError
            raise PerfmodelError("--backend: torch is not installed (pip install torch==2.13.0)") from None
    raise bad_value("--backend", name, "|".join(BACKENDS))
