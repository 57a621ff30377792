"""The int4 GEMV's kernel-native layout: AWQ int4 weights repacked once, when a model is loaded on a GPU.

The checkpoint keeps AWQ's layout (`qwen2q.quantizers.int4`); this module owns the layout the M = 1 kernel
(`int4_gemm.int4_gemv_kernel`) and the M = 2..512 kernel (`int4_decode`) read, and is the only place that packs its
bits (the kernels read them through `int4_gemm._code_value` and `int4_decode.group_asm`):

    words   int32 [N, K / 8]    row n of W; block b (K indices 128b .. 128b + 127) is words 16b .. 16b + 15.
                                Word c of block b holds the 8 codes of k = 128b + 16j + c, j = 0..7, code j at
                                bits (11 + 4j + t) mod 32 for its bit t: the natural nibble order (code j at bits
                                4j), rotated left by 11.
    zeros   uint8 [K / G, N]    the group zero points, unpacked
    scales  fp16  [K / G, N]    AWQ's own tensor (not copied)

Why this layout: a thread loads 4 consecutive words of one row (one 128-bit load) and turns each word into
8 floats with 8 LOP3s and 2 shifts, no int-to-float conversion.  The rotation puts three codes of every
word at bits 11-14, 15-18 and 19-22, just under the fp32 exponent (views: the word itself, the word
rotated right by 12, the word shifted left by 8 give all 8), and OR-ing an exponent onto a code there
gives an exact float:

    bits 11-14 | 0x45800000 = 4096 + q      bits 15-18 | 0x43800000 = 256 + q      bits 19-22 | 0x41800000 = 16 + q

so sum_k x_k (q_k - z) = sum_k x_k (MAGIC_k + q_k) - sum_k MAGIC_k x_k - z sum_k x_k, the last two being one
number per block shared by all N rows.  Codes j = 0..7 take the magic 4096, 256, 16, 4096, 256, 16, 4096,
256 (`MAGICS`).  The block's 16 x values of each j are contiguous, so x loads stay vectorised.

Memory: words are the same 0.5 byte per weight as AWQ's qweight, zeros 1 byte per group and column where
AWQ packs 0.5 (+1/256 byte per weight at group 128).  Every int4 path reads this layout (M = 1 the GEMV,
2..512 `int4_decode`, more rows `int4_prefill`), so a module on CUDA holds it instead of AWQ's qweight and
qzeros, and `to_awq` gives those back, bit for bit, when the module leaves the GPU or is saved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2q.quantizers import int4

BLOCK_K = 128  # K indices per block: 16 words x 8 codes
WORDS_PER_BLOCK = BLOCK_K // 8
ROTATION = 11  # code j, bit t at bit (ROTATION + 4j + t) mod 32
MAGICS = (4096.0, 256.0, 16.0, 4096.0, 256.0, 16.0, 4096.0, 256.0)  # value of code 0 read with its exponent
GROUP_SIZES = (32, 64, 128)  # scale groups that tile a 128-index block
_REPACK_ROWS = 2048  # rows of W `from_awq` / `to_awq` repack at a time (their int64 temporaries: ~24 bytes a weight)


@dataclass(frozen=True)
class Int4Native:
    """An AWQ int4 weight W [N, K] in the GEMV's layout (module docstring)."""

    words: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    @property
    def in_features(self) -> int:
        return self.words.shape[1] * 8

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[0]


def supports(in_features: int, group_size: int) -> bool:
    """True when W [N, K] with this group size has the layout: K in whole 128-index blocks, groups that tile
    a block."""
    return in_features % BLOCK_K == 0 and group_size in GROUP_SIZES


def _rotate_left(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 words in 0 .. 2**32 - 1, rotated left within 32 bits."""
    return ((words << bits) | (words >> (32 - bits))) & 0xFFFFFFFF


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (0..15, K % 128 == 0) -> words int32 [N, K / 8] in the native order."""
    N, K = codes.shape
    # [N, blocks, j, c] -> [N, blocks, c, j]: word c of a block gathers k = 16j + c.
    blocked = codes.long().view(N, K // BLOCK_K, 8, WORDS_PER_BLOCK).transpose(2, 3)
    shifts = torch.arange(0, 32, 4, device=codes.device)
    natural = (blocked << shifts).sum(dim=-1)
    return _to_int32(_rotate_left(natural, ROTATION)).reshape(N, K // 8)


def unpack_codes(words: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `pack_codes`: words int32 [N, K / 8] -> codes uint8 [N, K]."""
    N = words.shape[0]
    natural = _rotate_left(words.long() & 0xFFFFFFFF, 32 - ROTATION)
    shifts = torch.arange(0, 32, 4, device=words.device)
    codes = (natural.view(N, -1, WORDS_PER_BLOCK)[..., None] >> shifts) & 0xF  # [N, blocks, c, j]
    return codes.transpose(2, 3).reshape(N, -1).to(torch.uint8)


def from_awq(w: int4.Int4Weight) -> Int4Native:
    """Repack an AWQ GEMM weight (qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales fp16 [K / G, N]);
    ValueError when its shape has no native layout (`supports`)."""
    K, G = w.in_features, w.group_size
    if not supports(K, G):
        raise ValueError(f"int4 GEMV layout needs in_features % {BLOCK_K} == 0 and group_size in {GROUP_SIZES};"
                         f" got in_features={K}, group_size={G}")
    N = w.out_features
    words = torch.empty((N, K // 8), dtype=torch.int32, device=w.qweight.device)
    for n in range(0, N, _REPACK_ROWS):  # int64 temporaries of a few bytes per weight: a chunk of rows at a time
        columns = slice(n // int4.PACK_FACTOR, (n + _REPACK_ROWS) // int4.PACK_FACTOR)
        codes = int4.unpack(w.qweight[:, columns]).t()  # [rows, K]
        words[n:n + codes.shape[0]] = pack_codes(codes)
    return Int4Native(words, int4.unpack(w.qzeros).contiguous(), w.scales)


def to_awq(w: Int4Native) -> int4.Int4Weight:
    """Exact inverse of `from_awq`: the AWQ GEMM weight (qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8],
    and the same scales tensor) on w's device."""
    N, K = w.out_features, w.in_features
    qweight = torch.empty((K, N // int4.PACK_FACTOR), dtype=torch.int32, device=w.words.device)
    for n in range(0, N, _REPACK_ROWS):  # AWQ packs 8 consecutive rows of W per word: chunks stay whole words
        rows = slice(n, n + _REPACK_ROWS)
        qweight[:, n // int4.PACK_FACTOR:(n + _REPACK_ROWS) // int4.PACK_FACTOR] = int4.pack(
            unpack_codes(w.words[rows]).t())
    return int4.Int4Weight(qweight, int4.pack(w.zeros).contiguous(), w.scales)


def dequantize(w: Int4Native, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype`: (q - zero) * scale in fp32, rounded once (the same values as `int4.dequantize`)."""
    G = w.group_size
    q = unpack_codes(w.words).float()
    zeros = w.zeros.t().float().repeat_interleave(G, dim=1)
    scales = w.scales.t().float().repeat_interleave(G, dim=1)
    return ((q - zeros) * scales).to(dtype)
