"""What a compiled kernel is made of: its SASS and resource usage, read with the CUDA tools Triton bundles
(nvdisasm, cuobjdump under triton/backends/nvidia/bin); no GPU needed.

`disassemble(cubin)` gives one `Instruction` per SASS instruction, with the source line ptxas attributes it
to (Triton compiles with -lineinfo); `loops` finds each loop from its backward branch; `load_bits` names the
width of a global or async-copy load.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_SOURCE = re.compile(r'^\s*//## File "(.*)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_RESOURCES = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}
_GLOBAL_LOADS = ("LDG", "LDGSTS")  # register loads and async global -> shared copies
_BULK_LOADS = ("UTMALDG", "UBLKCP")  # TMA: one instruction copies a whole tile


@dataclass(frozen=True)
class Instruction:
    """address: byte offset in the kernel; opcode: with modifiers, predicate dropped (e.g. "LDG.E.64");
    text: the instruction as nvdisasm prints it; source: (file, line) ptxas attributes it to, or None;
    target: the label a branch jumps to, or None."""

    address: int
    opcode: str
    text: str
    source: tuple[str, int] | None
    target: str | None


def tool(name: str) -> Path:
    """Path of a CUDA tool Triton bundles (`nvdisasm`, `cuobjdump`, `ptxas`); FileNotFoundError if absent."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; this Triton install does not bundle {name}")
    return path


def _run_on_cubin(name: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool(name)), *args, f.name], check=True, capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{"REG": registers per thread, "STACK": stack frame bytes per thread, "SHARED": static shared bytes,
    "LOCAL": local memory bytes per thread} of the one kernel in `cubin`, from `cuobjdump -res-usage`."""
    return {key: int(value) for key, value in _RESOURCES.findall(_run_on_cubin("cuobjdump", ["-res-usage"], cubin))}


def parse(listing: str) -> tuple[list[Instruction], dict[str, int]]:
    """(instructions in address order, {label: address}) from `nvdisasm -g -c` output."""
    instructions, labels, pending, source = [], {}, [], None
    for line in listing.splitlines():
        if m := _SOURCE.match(line):
            source = (m.group(1), int(m.group(2)))
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTRUCTION.match(line):
            address, text = int(m.group(1), 16), m.group(2)
            labels.update((label, address) for label in pending)
            pending = []
            words = text.split()
            opcode = words[1] if words[0].startswith("@") else words[0]
            target = m.group(1) if (m := _TARGET.search(text)) else None
            instructions.append(Instruction(address, opcode, text, source, target))
    return instructions, labels


def disassemble(cubin: bytes) -> tuple[list[Instruction], dict[str, int]]:
    """`parse` of the cubin's SASS, with source lines."""
    return parse(_run_on_cubin("nvdisasm", ["-g", "-c"], cubin))


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[range]:
    """Each loop as the range of indices into `instructions` from its head (a label some later branch jumps
    back to) to its last backward branch, inclusive; one-instruction self-loops (the trap nvdisasm shows
    after EXIT) are left out."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    ends: dict[int, int] = {}
    for i, ins in enumerate(instructions):
        if ins.opcode.startswith("BRA") and ins.target in labels and labels[ins.target] < ins.address:
            head = index[labels[ins.target]]
            ends[head] = max(ends.get(head, i), i)
    return [range(head, end + 1) for head, end in sorted(ends.items())]


def load_bits(opcode: str) -> int | None:
    """Bits one thread reads with a global load (LDG) or an async global -> shared copy (LDGSTS); 128 for a
    TMA bulk copy; None for any other instruction. "LDG.E.64" -> 64, "LDG.E.U8" -> 8, "LDG.E" -> 32."""
    parts = opcode.split(".")
    if parts[0] in _BULK_LOADS:
        return 128
    if parts[0] not in _GLOBAL_LOADS:
        return None
    widths = [_WIDTHS[p] for p in parts[1:] if p in _WIDTHS]
    return widths[-1] if widths else 32


def shared_wavefronts(opcode: str) -> int:
    """Cycles of an SM's shared-memory / shuffle unit one warp's instruction takes, at best (no bank conflicts):
    SHFL 1; LDS / STS 1 per 32 bits of each thread's access (LDS.128: 4); 0 for anything else."""
    name = opcode.split(".")[0]
    if name == "SHFL":
        return 1
    if name in ("LDS", "STS"):
        bits = next((int(part) for part in opcode.split(".")[1:] if part.isdigit()), 32)
        return max(1, bits // 32)
    return 0
