"""python -m qwen2q.kernels.report compiles the kernels the runtime launches for sm_90 without a GPU and reads
their SASS; its occupancy arithmetic matches the Hopper limits it states."""
import kernel_testing  # noqa: F401  first: sets TRITON_INTERPRET before triton is imported, skips without triton

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2q.kernels import report

FIELDS = ("format", "kernel", "M", "K", "N", "triton", "arch", "regs", "spill_bytes", "smem_bytes",
          "weight_load_bits", "inner_loop_sass", "sass_per_weight", "ctas", "waves",
          "predicted_fraction_of_bandwidth")


def _missing_tools() -> list[str]:
    """The CUDA tools the report needs that this Triton install does not bundle."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("nvdisasm", "cuobjdump") if not (bin_dir / name).is_file()]
    if not any((bin_dir / name).is_file() for name in ("ptxas", "ptxas-blackwell")):
        missing.append("ptxas")
    return missing


@pytest.mark.parametrize("regs, smem, threads, expected", [
    (125, 4096, 128, 4),      # 128 registers a thread after rounding: 16,384 a CTA, 4 per SM
    (255, 2048, 128, 2),      # 256 after rounding: 32,768 a CTA
    (64, 0, 1024, 1),         # 32 warps a CTA, 2,048 threads an SM allow 2, registers 1
    (40, 147584, 256, 1),     # shared memory: 228 KiB an SM hold one 145 KiB CTA
    (16, 0, 32, 32),          # the 32-CTA limit
])
def test_ctas_per_sm(regs, smem, threads, expected):
    assert report.ctas_per_sm(regs, smem, threads) == expected


def test_projections_come_from_the_architecture_table():
    shapes = report.projections("7b")
    assert shapes == {(3584, 3584, True): "q_proj", (512, 3584, True): "k_proj/v_proj", (3584, 3584, False): "o_proj",
                      (18944, 3584, False): "gate_proj/up_proj", (3584, 18944, False): "down_proj"}


def test_report_compiles_every_format_for_hopper(tmp_path):
    if missing := _missing_tools():
        pytest.skip(f"Triton does not bundle {', '.join(missing)}")
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-m", "qwen2q.kernels.report", "--arch", "90", "--shapes", "0.5b",
                             "--m", "1", "--json", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["format"] for r in rows} == {"int4", "nf4", "int8"} and len(rows) == 3 * 5
    assert len(result.stdout.splitlines()) == 1 + len(rows)  # the table: a header and a line per row
    for row in rows:
        assert all(field in row for field in FIELDS), sorted(set(FIELDS) - set(row))
        expected = f"{row['format']}_gemv_kernel"
        assert row["arch"] == 90 and row["M"] == 1 and row["kernel"] == expected
        assert row["regs"] > 0 and row["spill_bytes"] >= 0 and row["smem_bytes"] >= 0
        assert row["weight_load_bits"] in {8, 16, 32, 64, 128}
        assert row["inner_loop_sass"] > 0 and row["sass_per_weight"] > 0
        assert row["ctas"] > 0 and row["waves"] > 0 and 0 < row["predicted_fraction_of_bandwidth"] <= 1
    # The int8 GEMV reads each row's words 128 bits at a time: only with the row stride Triton specialises as
    # divisible by 16, as the runtime passes it.
    assert {r["weight_load_bits"] for r in rows if r["format"] == "int8"} == {128}
    # The int4 GEMV reads the native layout 128 bits at a time (4 words of one row), the NF4 GEMV the checkpoint's.
    assert {r["weight_load_bits"] for r in rows if r["format"] in ("int4", "nf4")} == {128}
    # The NF4 GEMV looks levels up with one warp shuffle per weight, which the model counts.
    assert all(r["loop_shared"] >= r["inner_loop_sass"] // 4 for r in rows if r["format"] == "nf4")


def test_every_kernel_fits_the_shared_memory_of_an_ada_gpu(tmp_path):
    """sm_89 lets a block take 99 KiB of shared memory, where an H200 allows 227: the GEMM the runtime picks there
    must fit (the int4 GEMM's three stages took 112 KiB)."""
    if missing := _missing_tools():
        pytest.skip(f"Triton does not bundle {', '.join(missing)}")
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-m", "qwen2q.kernels.report", "--arch", "89", "--shapes", "0.5b",
                             "--m", "2048", "--json", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 15 and all(r["smem_bytes"] <= 99 * 1024 for r in rows), [r["smem_bytes"] for r in rows]
