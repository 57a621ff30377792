"""The CPU backend: quantized linears y = x @ W^T + b on CPU, from weights prepared once at load time.

`prepare(kernel, w, dtype, cache, workspace)` turns a format's weight object (W [N, K], on CPU) into the
form this backend runs, a *prepared weight*; `prepared.linear(x, bias)` then takes x bf16 [..., K] on CPU
and bias None or bf16 [N], and returns y bf16 [..., N].  Only bf16 activations are served (other dtypes
take the reference path).  M = the number of rows of x picks the path:

- int4 (AWQ GEMM, W = (q - z) * s, s fp16): repacked into torch's CPU int4 layout.  M <= INT4_KERNEL_ROWS:
  torch's `_weight_int4pack_mm_for_cpu`, which computes with W' = (q - 8) * S + Z and takes S and Z in
  x's dtype: S = bf16(s) = s (1 + e1) and Z = bf16((8 - z) * S) = (8 - z) S (1 + e2), |e1|, |e2| <= u = 2**-8,
  so W' = (q - z) s (1 + e1) + (8 - z) S e2 and |W' - W| <= u s (|q - z| + |8 - z| (1 + u)): a scale error
  of the weight itself plus an offset (Z from S rather than s: 2.6x less weight error on Qwen2.5-0.5B).
  Larger M: W dequantized exactly as the reference does (bf16 of the exact fp32 (q - z) * s) into a reused
  buffer, then the bf16 GEMM.
- compressed-tensors pack-quantized (`ct_pack`): W4A16, W = (c - z) * s with signed codes, is the int4 case
  with q = c + 8 and zero z + 8; W8A16 with one scale per row and no zero point is the int8 case with
  scale s.  Other variants (fp32 scales, other group sizes, asymmetric int8) take the reference path.
- int8 (bitsandbytes, W = q * (absmax / 127)): M <= INT8_KERNEL_ROWS: `torch._weight_int8pack_mm` with the
  row scale absmax / 127 rounded to bf16 (relative error <= 2**-8 per output row), applied after the
  K sum; larger M: W dequantized exactly as the reference, then the bf16 GEMM.
- NF4 (double-quantized absmax, blocks of 64): M <= NF4_KERNEL_ROWS, where bitsandbytes' CPU library has
  its AVX512-BF16 NF4 kernel and the CPU runs it (`nf4_kernel()`): that kernel, on its own repack of the
  codes (`bnb_cpu_layout`).  It multiplies x by each level rounded to bf16 (bf16 dot products, fp32 sums)
  and scales each block's sum by the absmax rounded to bf16 (stored so at load): W' = bf16(level) *
  bf16(absmax) = W (1 + e1)(1 + e2), |e1|, |e2| <= u / 2, so |W' - W| <= u |W| (1 + u / 4) per weight.
  Larger M, or without that kernel: W dequantized exactly as the reference (a byte -> pair of levels table,
  the absmax decoded once at load) into a reused buffer, then the bf16 GEMM.
- cache="bf16" (any format): a bf16 copy of the reference dequantize, kept; F.linear on it.

The exact dequantize paths give the reference's W bit for bit, so with the same GEMM they give its y.
Scratch memory comes from a `Workspace` shared by one model's linears, so a forward allocates no weight-
sized tensors; a workspace serves one forward at a time (not several threads at once).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2q.quantizers import ct_pack, int4, int8, nf4

DTYPE = torch.bfloat16  # the activation dtype this backend serves
INT4_KERNEL_ROWS = 32  # at most this many rows run torch's int4 kernel, more dequantize + GEMM
INT8_KERNEL_ROWS = 16  # likewise for the int8 kernel (its time grows faster with M)
NF4_KERNEL_ROWS = 128  # likewise for bitsandbytes' NF4 kernel (its time grows with M; it ties the exact path at 256)
CHUNK = 1 << 20  # weights dequantized per pass: 4 MiB of fp32 scratch, in L3 (fewer, larger ops beat L2-sized ones)
CACHES = ("bf16",)  # what `prepare(cache=...)` keeps besides None

ALIGNMENT = 64  # bytes: torch._weight_int8pack_mm crashes on an x or weight that starts off such a boundary
_INT4_BLOCK = 64  # the most output rows torch's CPU int4 layout stores together (N must be a multiple)
_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes
_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of an int64


@functools.cache
def int4_rows_per_block() -> int | None:
    """How many output rows B torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`) stores
    together, which depends on the instruction set torch runs its kernels with: 64 with AVX-512, 32 with
    AVX2.  In a block of B rows, byte k * B / 2 + r holds column k of row r (low nibble) and of row r + B / 2
    (high).  Probed once: a 64 x 2 probe whose rows hold r // 16 and r % 16; byte 0's high nibble is row
    B / 2's r // 16, and the whole probe must unpack back to itself.  None for any other layout (the int4
    weights then take the reference path)."""
    rows = torch.arange(_INT4_BLOCK, dtype=torch.int32)
    probe = torch.stack([rows // 16, rows % 16], dim=1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    block = 32 * (int(packed.view(-1)[0]) >> 4)
    if block not in (32, 64) or not torch.equal(_unpack_blocked(packed, block).to(torch.int32), probe):
        return None
    return block


def _unpack_blocked(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Codes uint8 [N, K] of packed uint8 [N, K / 2] in torch's CPU int4 layout with `block` rows a block."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(N // block, K, block // 2)
    codes = torch.cat([b & 15, b >> 4], dim=-1)  # [N / block, K, block]
    return codes.permute(0, 2, 1).reshape(N, K)


class Workspace:
    """Scratch tensors shared by the CPU linears of one model, by role, grown to the largest request.

    Every buffer is made outside inference mode, so that the same buffers serve inference-mode and
    ordinary forwards alike."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements of `dtype`, reused by the next call with this role."""
        buf = self._buffers.get(role)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype)
            self._buffers[role] = buf
        return buf[:numel]

    def weight(self, x: torch.Tensor, numel: int) -> torch.Tensor:
        """The buffer a dequantized weight goes into; a fresh one when autograd could keep it for backward."""
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.empty(numel, dtype=DTYPE)
        return self.get("weight", numel, DTYPE)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` if it starts on an ALIGNMENT-byte boundary, else a copy in torch's own (aligned) memory."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """x [..., K] -> contiguous [M, K]."""
    return x.reshape(-1, K).contiguous()


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


@dataclasses.dataclass(frozen=True, eq=False)
class Int4Prepared:
    """An int4 weight W = (q - z) * s [N, K] (G = group_size; AWQ, or compressed-tensors W4A16) for the CPU backend.

    packed:     uint8 [N, K / 2], torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`): per block
                of B rows (`int4_rows_per_block()`: 64 with AVX-512, 32 with AVX2), byte k * B / 2 + r holds
                row r (low nibble) and row r + B / 2 (high) of column k
    scale_zero: bf16 [K / G, N, 2], (S, Z) of the kernel's W' = (q - 8) * S + Z
    scale:      fp32 [N / B, K / G, 1, B], s (exact)            } the exact dequantize:
    offset:     fp32 [N / B, K / G, 1, B], -z * s (exact)       } W = q * scale + offset
    """

    packed: torch.Tensor
    scale_zero: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int
    workspace: Workspace

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @classmethod
    def from_weight(cls, w: int4.Int4Weight, workspace: Workspace) -> Int4Prepared | None:
        """An AWQ weight; None when N is not a multiple of 64 (every Qwen2 projection is) or torch's CPU int4
        layout is not one this backend knows."""
        if w.out_features % _INT4_BLOCK or int4_rows_per_block() is None:
            return None
        codes = int4.unpack(w.qweight).t()  # [N, K], 0..15
        return cls.from_parts(codes, int4.unpack(w.qzeros).float(), w.scales, w.group_size, workspace)

    @classmethod
    def from_compressed_tensors(cls, w: ct_pack.PackedWeight, workspace: Workspace) -> Int4Prepared | None:
        """A compressed-tensors W4A16 weight, W = (c - z) * s with signed c, z in [-8, 7]: the AWQ form with
        q = c + 8 and zero z + 8 (z = 0 when symmetric).  None where torch's kernel or the exact arithmetic
        does not apply: N % 64, a group size other than 32/64/128/256, fp32 scales (q * s would round)."""
        N, K = w.shape
        G = K // w.scale.shape[1]
        if N % _INT4_BLOCK or G not in _INT4_GROUPS or w.scale.dtype not in (torch.float16, torch.bfloat16) \
                or int4_rows_per_block() is None:
            return None
        codes = (ct_pack.unpack(w.packed, 4).to(torch.int16) + 8).to(torch.uint8)  # [N, K], 0..15
        if w.zero is None:
            zero = torch.full((K // G, N), 8.0)
        else:
            zero = ct_pack.unpack(w.zero.t().contiguous(), 4).float() + 8  # [K / G, N]
        return cls.from_parts(codes, zero.contiguous(), w.scale.t(), G, workspace)

    @classmethod
    def from_parts(cls, codes: torch.Tensor, z: torch.Tensor, s: torch.Tensor, G: int,
                   workspace: Workspace) -> Int4Prepared:
        """W = (q - z) * s: codes q uint8 [N, K] (0..15), z fp32 [K / G, N] (whole numbers 0..15), s [K / G, N]
        fp16 or bf16 (so that q * s and z * s are exact in fp32)."""
        N, K = codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        s, z = s.float().contiguous(), z.contiguous()
        S = s.to(DTYPE).float()
        scale_zero = torch.stack([S, (8 - z) * S], dim=-1).to(DTYPE)  # (8 - z) * S exact in fp32, then rounded

        B = int4_rows_per_block()

        def blocked(t):  # [K / G, N] -> [N / B, K / G, 1, B]
            return t.view(K // G, N // B, 1, B).permute(1, 0, 2, 3).contiguous()

        return cls(packed, scale_zero, blocked(s), blocked(-z * s), G, workspace)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """W^T bf16 [K, N] into `out` (bf16, N * K elements): bf16(q * s - z * s) = bf16((q - z) * s), the
        reference's value (both products and their difference are exact in fp32)."""
        N, K = self.shape
        B = self.scale.shape[-1]  # rows a block of the layout
        G, blocks, half = self.group_size, N // B, B // 16  # half: int64 words of one nibble half of a block row
        per_pass = max(1, CHUNK // (K * B))
        words = self.packed.view(blocks, K, B // 2).view(torch.int64)  # [blocks, K, B / 16]: 8 bytes per word
        wt = out.view(K, blocks, B).permute(1, 0, 2)  # [blocks, K, B] view of W^T
        codes = self.workspace.get("codes", per_pass * K * B, torch.uint8)
        values = self.workspace.get("values", per_pass * K * B, torch.float32)
        for b in range(0, blocks, per_pass):
            e = min(b + per_pass, blocks)
            c = codes[: (e - b) * K * B].view(e - b, K, B)
            cw = c.view(torch.int64)  # [e - b, K, B / 8]: the first half rows 0..B/2-1, the second the rest
            torch.bitwise_and(words[b:e], _NIBBLES, out=cw[..., :half])
            torch.bitwise_right_shift(words[b:e], 4, out=cw[..., half:]).bitwise_and_(_NIBBLES)
            v = values[: c.numel()].view(e - b, K // G, G, B)
            v.copy_(c.view(v.shape))
            torch.addcmul(self.offset[b:e], v, self.scale[b:e], out=v)
            wt[b:e].copy_(v.view(e - b, K, B))
        return out.view(K, N)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = self.shape
        x2 = _rows(x, K)
        if 0 < x2.shape[0] <= INT4_KERNEL_ROWS:
            y = _add_bias(torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                                      self.scale_zero), bias)
        else:
            y = F.linear(x2, self.dequantize(self.workspace.weight(x, N * K)).t(), bias)
        return y.view(*x.shape[:-1], N)


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Prepared:
    """A bitsandbytes int8 weight W [N, K] for the CPU backend.

    qweight:     int8 [N, K], the checkpoint's own tensor (copied only if it is not 64-byte aligned)
    scale:       fp32 [N], absmax / 127 as the reference computes it
    kernel_scale: bf16 [N], `scale` rounded for `torch._weight_int8pack_mm`
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    kernel_scale: torch.Tensor
    workspace: Workspace

    @classmethod
    def from_weight(cls, w: int8.Int8Weight, workspace: Workspace) -> Int8Prepared:
        scale = w.absmax / 127.0
        return cls(aligned(w.qweight.contiguous()), scale, scale.to(DTYPE), workspace)

    @classmethod
    def from_compressed_tensors(cls, w: ct_pack.PackedWeight, workspace: Workspace) -> Int8Prepared | None:
        """A compressed-tensors W8A16 weight with one scale per row and no zero point: W = c * s.  None
        otherwise (groups, or an asymmetric grid: the kernel has no zero point)."""
        if w.zero is not None or w.scale.shape[1] != 1:
            return None
        scale = w.scale.float().view(-1)
        return cls(aligned(ct_pack.unpack(w.packed, 8).contiguous()), scale, scale.to(DTYPE), workspace)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """W bf16 [N, K] into `out`: bf16(fp32(q) * scale), the reference's arithmetic."""
        N, K = self.qweight.shape
        rows = max(1, CHUNK // K)
        values = self.workspace.get("values", min(rows, N) * K, torch.float32)
        w = out.view(N, K)
        for r in range(0, N, rows):
            e = min(r + rows, N)
            v = values[: (e - r) * K].view(e - r, K)
            v.copy_(self.qweight[r:e]).mul_(self.scale[r:e, None])
            w[r:e].copy_(v)
        return w

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = self.qweight.shape
        x2 = _rows(x, K)
        if 0 < x2.shape[0] <= INT8_KERNEL_ROWS:
            y = _add_bias(torch._weight_int8pack_mm(aligned(x2), self.qweight, self.kernel_scale), bias)
        else:
            y = F.linear(x2, self.dequantize(self.workspace.weight(x, N * K)), bias)
        return y.view(*x.shape[:-1], N)


_BNB_ROWS = 32  # bitsandbytes' CPU 4-bit layout stores 32 output rows together
_BNB_NF4 = "gemv_4bit_inference_cpu_nf4_bf16"  # its NF4 kernel in bitsandbytes' C library (bitsandbytes >= 0.48)
_BNB_NF4_DEQUANTIZE = "cdequantize_blockwise_cpu_nf4_bf16"  # and its NF4 dequantize to bf16


@functools.cache
def _bitsandbytes_library():
    """bitsandbytes' CPU C library (ctypes) and whether the CPU has AVX512-BF16, or (None, False) without it.

    The library file is opened directly: importing the bitsandbytes package costs 3 s more (it imports
    torch's compiler stack), and it logs a warning when the optional `kernels` package is absent."""
    spec = importlib.util.find_spec("bitsandbytes")  # finds the package without importing it
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("libbitsandbytes_cpu.*")
                   if f.suffix in (".so", ".dylib", ".dll"))
    if not files:
        return None, False
    try:
        lib = ctypes.CDLL(str(files[0]))
    except OSError:
        return None, False
    try:
        probe = lib.has_avx512bf16_cpu
    except AttributeError:  # a library built without AVX512-BF16 code
        return lib, False
    probe.restype = ctypes.c_bool
    return lib, bool(probe())


def _library_function(name: str, needs_avx512_bf16: bool):
    lib, avx512_bf16 = _bitsandbytes_library()
    if lib is None or (needs_avx512_bf16 and not avx512_bf16):
        return None
    try:
        return getattr(lib, name)
    except (AttributeError, RuntimeError):  # a library built without it
        return None


@functools.cache  # called on every decode step: the lookup once
def nf4_kernel():
    """bitsandbytes' CPU NF4 kernel (a ctypes function), or None where it cannot run here: bitsandbytes
    missing, its C library without the kernel, or a CPU without AVX512-BF16 (the kernel's instructions)."""
    return _library_function(_BNB_NF4, needs_avx512_bf16=True)


@functools.cache
def nf4_dequantizer():
    """bitsandbytes' CPU NF4 dequantize to bf16 (a ctypes function; the library picks its code for the CPU), or
    None.  It computes bf16(level * absmax) from the fp32 absmax, the reference's value (tested bit for bit)."""
    return _library_function(_BNB_NF4_DEQUANTIZE, needs_avx512_bf16=False)


def bnb_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """NF4 codes uint8 [N, K] (0..15; N a multiple of 32, K even) -> uint8 [N, K / 2], the layout of
    bitsandbytes' CPU kernel: per block of 32 rows and pair of columns (2j, 2j + 1), 32 bytes; byte 2r + c
    holds row r, column 2j + c in its low nibble and row r + 16, column 2j + c in its high nibble."""
    N, K = codes.shape
    tile = codes.view(N // _BNB_ROWS, _BNB_ROWS, K // 2, 2).transpose(1, 2)  # [N / 32, K / 2, 32 rows, 2]
    tile = tile.reshape(N // _BNB_ROWS, K // 2, 2, 32)  # [.., half (rows 0-15 | 16-31), 16 rows x 2 columns]
    return (tile[:, :, 1] << 4 | tile[:, :, 0]).reshape(N, K // 2).contiguous()


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Prepared:
    """A bitsandbytes NF4 weight W [N, K] (N * K a multiple of 64) for the CPU backend.

    packed: uint8 [N * K / 2], the checkpoint's codes (not copied): element 2j in the high nibble of byte j
    absmax: fp32 [N * K / 64], each block's absmax decoded once (`nf4.decode_absmax`, the reference's)
    pairs:  int64 [256], entry b holds the fp32 pair (level[b >> 4], level[b & 15]) as one word
    kernel_codes:  uint8 [N, K / 2], `bnb_cpu_layout` of the codes, or None (no kernel: the exact path only)
    kernel_absmax: bf16 [K / 64, N], bf16(absmax) by column block, or None
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    pairs: torch.Tensor
    shape: tuple[int, int]
    workspace: Workspace
    kernel_codes: torch.Tensor | None = None
    kernel_absmax: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, w: nf4.NF4Weight, workspace: Workspace) -> NF4Prepared | None:
        """None when N * K is not a multiple of 64 (a partial last block; no Qwen2 projection has one).  The
        kernel's tensors are made when it can run here and N % 32 == 0 == K % 64 (each block in one row)."""
        N, K = w.shape
        if (N * K) % nf4.BLOCK_SIZE:
            return None
        levels = nf4.NF4_LEVELS
        pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=-1).contiguous()
        absmax = nf4.decode_absmax(w)
        kernel_codes = kernel_absmax = None
        if nf4_kernel() is not None and N % _BNB_ROWS == 0 and K % nf4.BLOCK_SIZE == 0:
            packed = w.packed.view(-1)
            codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(N, K)
            kernel_codes = bnb_cpu_layout(codes)
            kernel_absmax = absmax.view(N, K // nf4.BLOCK_SIZE).t().to(DTYPE).contiguous()
        return cls(w.packed.view(-1), absmax, pairs.view(torch.int64).view(256), (N, K), workspace,
                   kernel_codes, kernel_absmax)

    def kernel_linear(self, x2: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' kernel: x2 bf16 [M, K] contiguous -> y bf16 [M, N]."""
        N, K = self.shape
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=DTYPE)
        p = ctypes.c_void_p
        nf4_kernel()(ctypes.c_int64(M), ctypes.c_int64(N), ctypes.c_int64(K), p(x2.data_ptr()),
                     p(self.kernel_codes.data_ptr()), p(self.kernel_absmax.data_ptr()), p(y.data_ptr()),
                     ctypes.c_int64(nf4.BLOCK_SIZE), ctypes.c_int64(K), ctypes.c_int64(N))
        return y

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """W bf16 [N, K] into `out`: bf16(level[code] * absmax) in fp32, the reference's arithmetic (by
        bitsandbytes' C dequantize where it has one, 7x faster on the 0.5B's gate_proj; else in torch)."""
        N, K = self.shape
        dequantizer = nf4_dequantizer()
        if dequantizer is not None and K % nf4.BLOCK_SIZE == 0:  # it restarts the blocks at each row
            p = ctypes.c_void_p
            dequantizer(p(self.packed.data_ptr()), p(self.absmax.data_ptr()), p(out.data_ptr()),
                        ctypes.c_longlong(nf4.BLOCK_SIZE), ctypes.c_longlong(N), ctypes.c_longlong(K))
            return out.view(self.shape)
        n = N * K
        step = min(CHUNK, n)
        index = self.workspace.get("index", step // 2, torch.int32)
        values = self.workspace.get("values", step, torch.float32)
        flat = out.view(-1)
        for s in range(0, n, step):
            e = min(s + step, n)
            i, v = index[: (e - s) // 2], values[: e - s]
            i.copy_(self.packed[s // 2 : e // 2])
            torch.index_select(self.pairs, 0, i, out=v.view(torch.int64))
            v.view(-1, nf4.BLOCK_SIZE).mul_(self.absmax[s // nf4.BLOCK_SIZE : e // nf4.BLOCK_SIZE, None])
            flat[s:e].copy_(v)
        return out.view(self.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = self.shape
        x2 = _rows(x, K)
        if self.kernel_codes is not None and 0 < x2.shape[0] <= NF4_KERNEL_ROWS and not x.requires_grad:
            y = _add_bias(self.kernel_linear(x2), bias)
        else:
            y = F.linear(x2, self.dequantize(self.workspace.weight(x, N * K)), bias)
        return y.view(*x.shape[:-1], N)


@dataclasses.dataclass(frozen=True, eq=False)
class DensePrepared:
    """cache="bf16": weight bf16 [N, K], the reference dequantize of any format, kept."""

    weight: torch.Tensor

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


def _from_compressed_tensors(w: ct_pack.PackedWeight, workspace: Workspace):
    if w.bits == 4:
        return Int4Prepared.from_compressed_tensors(w, workspace)
    return Int8Prepared.from_compressed_tensors(w, workspace)


_FROM_WEIGHT = {"int4_linear": Int4Prepared.from_weight, "int8_linear": Int8Prepared.from_weight,
                "nf4_linear": NF4Prepared.from_weight, "ct_pack_linear": _from_compressed_tensors}


def prepare(kernel: str, w, dequantize, cache: str | None, workspace: Workspace):
    """The prepared form of weight object `w` (its tensors on CPU) whose format names `kernel` (its
    `qwen2q.kernels` op, e.g. "int4_linear"; "" for none) and dequantizes with `dequantize(w, dtype)`.

    cache "bf16": a `DensePrepared` for any format; None: the format's prepared weight, or None where this
    backend has none (a format without a CPU op, or a shape it does not take)."""
    with torch.inference_mode(False), torch.no_grad():
        if cache == "bf16":
            return DensePrepared(dequantize(w, DTYPE).contiguous())
        from_weight = _FROM_WEIGHT.get(kernel)
        return from_weight(w, workspace) if from_weight is not None else None
