"""Which global loads of a Triton kernel's PTX read through which kernel argument, and how wide they are.

PTX keeps LLVM's virtual registers, one per value, so a register-level dataflow pass is exact enough: a
register is derived from an argument when an instruction that reads a derived register writes it (starting
from the `ld.param` of the argument); a loaded value is data, never an address, so loads end the chain.
A global load (`ld.global`) or async copy (`cp.async`, TMA `cp.async.bulk`) whose global address is a
derived register reads through that argument.  ptxas keeps the width of every such load (ld.global.v2.b32
is LDG.E.64 in the SASS), so `weight_load_bits` can be read here, where the argument is still known, rather
than from SASS line numbers, which LLVM sometimes attributes to a neighbouring line.

Kernel parameters in the PTX are the launch's arguments that were not specialised to constants
(CompiledKernel.src.signature values other than "constexpr"), in order, then Triton's scratch pointers.
Only pointer arguments are followed: an address also derives from strides and sizes.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_REGISTER = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]")
_ADDRESS = re.compile(r"\[\s*([^\]]*)\]")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)")
_NO_DESTINATION = ("st.", "cp.", "bra", "ret", "bar.", "red.", "prefetch", "fence", "membar", "mbarrier.",
                   "griddepcontrol", "exit", "trap")
_TYPE_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
              "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


@dataclass(frozen=True)
class Load:
    """A global load or copy: index of its statement, bits one thread reads, whether it is an async copy,
    and the kernel argument its address derives from (None when from no argument or several)."""

    index: int
    bits: int
    is_async: bool
    argument: str | None


def statements(ptx: str) -> list[str]:
    """The kernel body's statements and block labels, one string each, predicates kept; comments, other
    labels and directives (.loc, .reg, ...) dropped."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip().lstrip("{}").strip()  # scope braces may share a line with code
        if _LABEL.match(line):
            out.append(line)
        elif line and not line.startswith((".", ")", "(")) and not line.endswith(":"):
            parts = (part.strip().lstrip("{").strip() for part in line.split(";"))  # no statement starts with {
            out.extend(part + ";" for part in parts if part and part != "}")
    return out


def _opcode(statement: str) -> str:
    words = statement.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def _operands(statement: str) -> str:
    words = statement.rstrip(";").split(None, 2 if statement.startswith("@") else 1)
    return words[-1] if len(words) > (2 if statement.startswith("@") else 1) else ""


def _derived(body: list[str], start: set[str]) -> set[str]:
    """Registers derived from the `start` registers (see the module docstring)."""
    derived, changed = set(start), True
    while changed:
        changed = False
        for s in body:
            op = _opcode(s)
            if op.startswith(("ld.", "cp.", "tex.", "atom.")) or op.startswith(_NO_DESTINATION):
                continue
            operands = _operands(s)
            head, _, rest = operands.partition("}") if operands.startswith("{") else operands.partition(",")
            if any(r in derived for r in _REGISTER.findall(rest)):
                new = set(_REGISTER.findall(head)) - derived
                if new:
                    derived |= new
                    changed = True
    return derived


def _bits(statement: str, op: str) -> int:
    if op.startswith("cp.async.bulk"):
        return 128  # TMA: a whole tile per instruction
    if op.startswith("cp.async"):
        size = re.search(r"\],\s*(0x[0-9a-f]+|\d+)\b", statement)
        return 8 * int(size.group(1), 0) if size else 32
    parts = op.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    return vector * next((_TYPE_BITS[p] for p in reversed(parts) if p in _TYPE_BITS), 32)


def global_loads(ptx: str, signature: dict[str, str]) -> list[Load]:
    """Every ld.global / cp.async of `ptx`, with the pointer argument its address derives from; signature:
    {argument: Triton type ("*i32", "i32", "constexpr", ...)} in the kernel's order (CompiledKernel.src)."""
    arguments = [(arg, kind) for arg, kind in signature.items() if kind != "constexpr"]
    body = statements(ptx)
    params: dict[int, set[str]] = {}
    for s in body:
        if m := _PARAM.search(s):
            params.setdefault(int(m.group(2)), set()).add(m.group(1))
    derived = {arguments[i][0]: _derived(body, regs) for i, regs in sorted(params.items())
               if i < len(arguments) and arguments[i][1].startswith("*")}
    loads = []
    for index, s in enumerate(body):
        op = _opcode(s)
        if not (op.startswith("ld.global") or (op.startswith("cp.async") and ".shared" in op and ".global" in op)):
            continue
        addresses = _ADDRESS.findall(s)
        address = addresses[1] if op.startswith("cp.async") and len(addresses) > 1 else addresses[0]
        regs = set(_REGISTER.findall(address))
        sources = [arg for arg, d in derived.items() if regs & d]
        loads.append(Load(index, _bits(s, op), op.startswith("cp.async"), sources[0] if len(sources) == 1 else None))
    return loads


def loops(body: list[str]) -> list[range]:
    """Each loop of the statement list as the range from its label to its last backward branch."""
    labels = {m.group(1): i for i, s in enumerate(body) if (m := _LABEL.match(s))}
    ends: dict[int, int] = {}
    for i, s in enumerate(body):
        if (m := _BRANCH.search(s)) and m.group(1) in labels and labels[m.group(1)] < i:
            ends[labels[m.group(1)]] = max(ends.get(labels[m.group(1)], i), i)
    return [range(head, end + 1) for head, end in sorted(ends.items())]


def loads_per_iteration(ptx: str, signature: dict[str, str], argument: str) -> dict[str, Counter]:
    """{argument or "other": Counter(bits)} of the loads in the innermost PTX loop holding a load through
    `argument` (empty if none does)."""
    loads = global_loads(ptx, signature)
    holding = [loop for loop in loops(statements(ptx)) if any(ld.index in loop and ld.argument == argument
                                                               for ld in loads)]
    if not holding:
        return {}
    loop = min(holding, key=len)
    counts: dict[str, Counter] = {}
    for ld in loads:
        if ld.index in loop:
            counts.setdefault(ld.argument or "other", Counter())[ld.bits] += 1
    return counts
