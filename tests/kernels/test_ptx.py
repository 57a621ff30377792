"""kernels.ptx attributes each global load to the pointer argument its address comes from."""
from qwen2q.kernels import ptx

# packed bytes are loaded 64 bits at a time and by async copy; each loaded code indexes a table in global
# memory.  The table load's address is computed from loaded data, so it reads through levels_ptr only.
# The packed address is formed in a brace scope, as Triton's inline assembly writes some statements.
PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 4;
	{ .reg .b32 t;
	{ add.s64 	%rd4, %rd1, %rd3; }
	}
	ld.global.b16 	{ %rs1 }, [ %rd4 + 0 ];
$L__BB0_1:                              // =>This Inner Loop Header: Depth=1
	.loc	1 10 17
	@%p1 ld.global.v2.b32 { %r2, %r3 }, [ %rd4 + 0 ];
	and.b32 	%r4, %r2, 15;
	mul.wide.u32 	%rd5, %r4, 4;
	add.s64 	%rd6, %rd2, %rd5;
	ld.global.b32 	{ %r5 }, [ %rd6 + 0 ];
	cp.async.cg.shared.global [ %r6 + 0 ], [ %rd4 + 0 ], 0x10, %r7;
	cp.async.commit_group;
	add.s64 	%rd4, %rd4, 64;
	@%p2 bra 	$L__BB0_1;
	ret;
}
"""
SIGNATURE = {"packed_ptr": "*u8", "BLOCK_K": "constexpr", "levels_ptr": "*fp32", "K": "i32"}


def test_loads_are_attributed_through_address_arithmetic_but_not_through_loaded_data():
    loads = ptx.global_loads(PTX, SIGNATURE)
    assert [(ld.argument, ld.bits, ld.is_async) for ld in loads] == [
        ("packed_ptr", 16, False), ("packed_ptr", 64, False), ("levels_ptr", 32, False), ("packed_ptr", 128, True)]


def test_loads_per_iteration_counts_the_innermost_loop_holding_the_argument():
    counts = ptx.loads_per_iteration(PTX, SIGNATURE, "packed_ptr")
    assert counts == {"packed_ptr": {64: 1, 128: 1}, "levels_ptr": {32: 1}}
    assert ptx.loads_per_iteration(PTX, SIGNATURE, "K") == {}
