"""kernels.sass reads nvdisasm listings: instructions with their source lines, loops from backward branches,
and the width of global loads."""
import pytest

from qwen2q.kernels import sass

# The shape of `nvdisasm -g -c` output: a loop (.L_x_0 .. the backward BRA), then the self-loop nvdisasm
# shows after EXIT, which is no loop of the kernel's.
LISTING = """
        .global         k
k:
.text.k:
	//## File "/src/k.py", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
	//## File "/src/k.py", line 10
        /*0010*/               @P0 LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0020*/                   IADD3 R4, R4, 0x8, RZ ;
	//## File "/src/k.py", line 12
        /*0030*/              @!P1 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""


def test_parse_keeps_order_source_lines_and_branch_targets():
    instructions, labels = sass.parse(LISTING)
    assert [i.opcode for i in instructions] == ["LDC", "LDG.E.64", "IADD3", "BRA", "EXIT", "BRA"]
    assert [i.address for i in instructions] == [0, 0x10, 0x20, 0x30, 0x40, 0x50]
    assert instructions[1].source == ("/src/k.py", 10) and instructions[2].source == ("/src/k.py", 10)
    assert instructions[3].target == ".L_x_0" and instructions[1].target is None
    assert labels == {".L_x_0": 0x10, ".L_x_1": 0x50}


def test_loops_span_head_to_backward_branch_without_the_trailing_trap():
    instructions, labels = sass.parse(LISTING)
    assert sass.loops(instructions, labels) == [range(1, 4)]


@pytest.mark.parametrize("opcode, bits", [
    ("LDG.E", 32), ("LDG.E.U8", 8), ("LDG.E.S16", 16), ("LDG.E.64", 64), ("LDG.E.128.CONSTANT", 128),
    ("LDGSTS.E.BYPASS.LTC128B.128", 128), ("LDGSTS.E.64", 64), ("UTMALDG.2D", 128),
    ("LDS.128", None), ("LDGDEPBAR", None), ("STG.E.64", None), ("LDC.64", None),
])
def test_load_bits(opcode, bits):
    assert sass.load_bits(opcode) == bits


@pytest.mark.parametrize("opcode, expected", [("SHFL.IDX", 1), ("LDS", 1), ("LDS.U.128", 4), ("STS.64", 2),
                                              ("LDS.U16", 1), ("FFMA", 0), ("LDG.E.128", 0)])
def test_shared_wavefronts(opcode, expected):
    assert sass.shared_wavefronts(opcode) == expected
