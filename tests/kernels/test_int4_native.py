"""The int4 GEMV's native layout: bit placement, the magic-number reading the kernel relies on, and repacking
AWQ weights without changing a value."""
import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported

import numpy as np
import pytest
import torch

from qwen2q.kernels import int4_native
from qwen2q.quantizers import int4


def _codes(N: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (N, K), generator=kt.generator("codes", N, K, seed), dtype=torch.uint8)


def test_code_j_of_word_c_sits_at_bits_11_plus_4j_rotated():
    N, K = 2, 256
    for block in (0, 1):
        for j in range(8):
            for c in (0, 5, 15):
                codes = torch.zeros(N, K, dtype=torch.uint8)
                codes[1, 128 * block + 16 * j + c] = 0b1011
                words = int4_native.pack_codes(codes).long() & 0xFFFFFFFF
                expected = sum(1 << ((11 + 4 * j + t) % 32) for t in range(4) if (0b1011 >> t) & 1)
                assert words[1, 16 * block + c].item() == expected
                assert words.count_nonzero().item() == 1


def test_pack_and_unpack_are_inverse():
    codes = _codes(64, 384)
    assert torch.equal(int4_native.unpack_codes(int4_native.pack_codes(codes)), codes)


def test_each_code_reads_as_magic_plus_q_through_the_kernels_three_views():
    """What `_code_value` computes, in numpy: the word, rotr(word, 12) and word << 8, masked at bits 11, 15 or 19
    and OR-ed with an exponent, are exactly MAGICS[j] + q for every code j of every word."""
    codes = _codes(16, 128, seed=1)
    w = int4_native.pack_codes(codes).numpy().view(np.uint32)
    views = (w, (w >> np.uint32(12)) | (w << np.uint32(20)), w << np.uint32(8))
    exponents = {11: 0x45800000, 15: 0x43800000, 19: 0x41800000}
    for j in range(8):
        field = 11 + 4 * (j % 3)
        bits = (views[j // 3] & np.uint32(0xF << field)) | np.uint32(exponents[field])
        values = bits.view(np.float32)
        expected = int4_native.MAGICS[j] + codes[:, 16 * j: 16 * j + 16].numpy().astype(np.float32)
        assert np.array_equal(values, expected), j


@pytest.mark.parametrize("K, N, G", [(896, 128, 32), (1024, 192, 64), (4864, 64, 128), (256, 4160, 64)])
def test_repacking_awq_keeps_every_value(K, N, G):
    w = kt.random_int4(K, N, G)
    native = int4_native.from_awq(w)
    assert native.words.shape == (N, K // 8) and native.zeros.shape == (K // G, N) and native.scales is w.scales
    assert (native.in_features, native.out_features, native.group_size) == (K, N, G)
    assert torch.equal(int4_native.dequantize(native, torch.float32), int4.dequantize(w, torch.float32))


@pytest.mark.parametrize("K, G", [(320, 64), (896, 16), (896, 256)])
def test_shapes_without_the_layout_are_refused(K, G):
    assert not int4_native.supports(K, G)
    with pytest.raises(ValueError, match="int4 GEMV layout needs in_features % 128 == 0"):
        int4_native.from_awq(kt.random_int4(K, 64, G))


@pytest.mark.parametrize("K, N, G", [(384, 200, 32), (256, 4160, 64)])  # 4160: two whole 2048-row chunks and a part
def test_to_awq_gives_the_awq_tensors_back_bit_for_bit(K, N, G):
    w = kt.random_int4(K, N, G)
    back = int4_native.to_awq(int4_native.from_awq(w))
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.qzeros, w.qzeros) and back.scales is w.scales
