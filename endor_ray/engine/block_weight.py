"""A Linear weight held as its stored blocks on the CPU: small batches multiply from the blocks.

In host memory a decoder layer at batch 1 takes as long as reading its weights. Decoding an INT8
or INT4 layer to bf16 and multiplying with torch reads the blocks, writes 2 bytes a weight and
reads them again, whatever the precision; `endor_ray.format.cpu_matvec` reads each stored byte
once. A `BlockWeight` is what the layer source hands out on the CPU for a tensor that has such a
product (dense int8/int4, q8_0/q4_0/q4_1/q5_0/q5_1, q4_k/q5_k/q6_k with rows of whole super-blocks):
a tensor of the weight's shape and dtype that owns no dense storage, only the `EncodedTensor`. The
model's own `nn.Linear` runs `F.linear(x, weight, bias)`; `__torch_function__` takes that call and

- with at most `MAX_MATVEC_ROWS` rows of x (a decode step of a small batch) multiplies from the
  blocks: x in float32, each weight the reference decode's value, float32 sums, then the bias and
  one rounding to x's dtype (as torch's bf16 GEMM does: float32 accumulation, one rounding);
- with more rows (a prefill) decodes into a dense weight and calls `F.linear` as before: the
  decode is paid once for many rows, and the result is the dense path's, bit for bit.

The embedding table and LM head of a store that keeps a GGUF's blocks are BlockWeights too:
`F.embedding` decodes only the rows its ids name (each row of a GGUF tensor is whole blocks), so
the table is never held decoded; an LM head multiplies from its blocks as any Linear, the q6_k one
llama.cpp's Q4_0 / Q4_K_M files carry included (one whose encoding has no CPU product, such as q3_k
or a k-type stored over flattened elements, is left decoded by the model runner).

Any other operation on the weight (a model that reads it some other way, `torch.equal` in a test)
sees the decoded dense tensor, so nothing breaks, only slower; `detach` (nn.Parameter) keeps the
blocks and `.to("meta")` (releasing a layer) drops them. torchao's quantized weights are tensor
subclasses that take F.linear the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from endor_ray.format.cpu_decode import decode_into
from endor_ray.format.cpu_matvec import has_matvec, matvec
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS, block_type
from endor_ray.format.tensor import EncodedTensor, gguf_tensor

# `.to("meta")` reaches __torch_dispatch__ as _to_copy, or as to.dtype_layout under inference_mode
_TO_OPS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout)
MAX_MATVEC_ROWS = 8  # rows of x up to which F.linear multiplies from the blocks (a decode step's batch)


class BlockWeight(torch.Tensor):
    """A [rows, cols] weight of `dtype` held as `blocks` (an EncodedTensor with a CPU product)."""

    blocks: EncodedTensor
    threads: int

    @staticmethod
    def __new__(cls, blocks: EncodedTensor, dtype: torch.dtype | None = None, threads: int = 1) -> BlockWeight:
        with torch.inference_mode(False):  # a normal tensor wherever it is made: modules load it anywhere
            weight = torch.Tensor._make_wrapper_subclass(cls, blocks.shape, dtype=dtype or blocks.dtype,
                                                         device=blocks.values.device, requires_grad=False)
        weight.blocks, weight.threads = blocks, threads
        weight._is_param = True  # an nn.Parameter already: load_state_dict(assign=True) takes it as it is
        return weight

    def __init__(self, blocks: EncodedTensor, dtype: torch.dtype | None = None, threads: int = 1):
        super().__init__()

    def __repr__(self) -> str:
        enc = self.blocks
        return f"BlockWeight({list(enc.shape)}, {enc.values_encoding}, {self.dtype})"

    def dense(self) -> torch.Tensor:
        """The decoded weight in this tensor's dtype (the store's dtype decoded, then widened)."""
        out = decode_into(self.blocks, torch.empty(self.blocks.shape, dtype=self.blocks.dtype), threads=self.threads)
        return out.to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """weight[ids] ([*ids.shape, cols] in this tensor's dtype), decoding only those rows."""
        enc, flat = self.blocks, ids.reshape(-1).to(torch.long)
        if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < enc.shape[0]:
            raise IndexError(f"ids outside the {enc.shape[0]} rows of the embedding")
        row_bytes = enc.values.numel() // enc.shape[0]
        picked = gguf_tensor(enc.values.view(enc.shape[0], row_bytes)[flat], enc.values_encoding,
                             (flat.numel(), enc.shape[1]), enc.dtype)
        out = decode_into(picked, torch.empty(picked.shape, dtype=enc.dtype), threads=self.threads)
        return out.to(self.dtype).view(*ids.shape, enc.shape[1])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, BlockWeight) and not isinstance(x, BlockWeight) and not isinstance(bias, BlockWeight):
                return block_linear(x, weight, bias)
        if func is F.embedding:
            ids, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(weight, BlockWeight) and rows_of_whole_blocks(weight.blocks) and not isinstance(ids, BlockWeight):
                return weight.rows(ids)  # padding_idx, max_norm: not used by a frozen decoder's lookup
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:  # nn.Parameter(weight): the same blocks
            weight = args[0]
            return BlockWeight(weight.blocks, weight.dtype, weight.threads)
        if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
            return False  # Module._apply (release_layer) then sets a new parameter: nothing decoded to ask
        if func in _TO_OPS and kwargs.get("device") == torch.device("meta"):
            weight = args[0]  # release_layer: back to a meta tensor, the blocks let go
            return torch.empty(weight.shape, dtype=kwargs.get("dtype") or weight.dtype, device="meta")
        dense = tree_map(lambda value: value.dense() if isinstance(value, BlockWeight) else value, (args, kwargs))
        return func(*dense[0], **dense[1])


def block_linear(x: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., cols]: from the blocks for few rows, else dense."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > MAX_MATVEC_ROWS or x.device.type != "cpu" or not has_matvec(weight.blocks):
        return F.linear(x, weight.dense().to(x.device), bias)
    flat = matvec(weight.blocks, x.reshape(rows, x.shape[-1]).float(), threads=weight.threads)
    if bias is not None:
        flat += bias.float()
    return flat.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def rows_of_whole_blocks(enc: EncodedTensor) -> bool:
    """Whether each row of `enc` is whole blocks of its bytes: a dense 2-D GGUF tensor whose rows are blocks."""
    return (enc.layout == "dense" and enc.values_encoding in GGUF_ENCODINGS and len(enc.shape) == 2
            and enc.shape[1] % block_type(enc.values_encoding).block_elems == 0)


def block_weight_or_none(enc: EncodedTensor, dtype: torch.dtype | None, threads: int) -> BlockWeight | None:
    """A BlockWeight for `enc` where it has a CPU product (see `has_matvec`), else None (decode it)."""
    return BlockWeight(enc, dtype, threads) if has_matvec(enc) else None
