"""qwen2q reads llm-compressor's own output: checkpoints llm-compressor 0.14 writes from the embedded model.

Opt-in: `-m llmcompressor` with QWEN2Q_LLMC_PYTHON naming the python of a venv with llm-compressor
(`dev/qwen2q_dev/research/peers/setup.sh` makes one: PEERS/llmc), e.g.

    QWEN2Q_LLMC_PYTHON=/work/peers/llmc/bin/python pytest -m llmcompressor tests/test_llmcompressor.py

The oracle is the compressed-tensors package (the library llm-compressor saves with): its decompressor,
run on the checkpoint's own tensors with the scheme from the checkpoint's own config, must give every
linear's weight exactly as qwen2q dequantizes it; and the loaded model must generate.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen2q
from qwen2q.files import DEFAULT_MODEL
from qwen2q.qlinear import QuantLinear

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402

pytestmark = pytest.mark.llmcompressor

SCRIPT = Path(__file__).resolve().parents[1] / "dev/qwen2q_dev/research/peers/llmc_quantize.py"
PYTHON = os.environ.get("QWEN2Q_LLMC_PYTHON")


@pytest.fixture(scope="module")
def llmc_python() -> str:
    if not PYTHON or not Path(PYTHON).exists():
        pytest.skip("QWEN2Q_LLMC_PYTHON does not name a python with llm-compressor")
    return PYTHON


def their_schemes(dst: Path) -> dict[str, QuantizationScheme]:
    """{module name: scheme} from the checkpoint's own quantization_config (targets "Linear", ignore lm_head)."""
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized", config
    groups = list(config["config_groups"].values())
    assert len(groups) == 1 and groups[0]["targets"] == ["Linear"], groups
    return QuantizationScheme.model_validate({k: v for k, v in groups[0].items() if k != "format"})


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A16"])
def test_qwen2q_loads_llmcompressor_output_exactly(llmc_python, tmp_path, scheme):
    dst = tmp_path / scheme
    run = subprocess.run([llmc_python, str(SCRIPT), str(DEFAULT_MODEL), str(dst), scheme], capture_output=True,
                         text=True, timeout=1800, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    their = their_schemes(dst)
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
    m = qwen2q.load(dst, dtype="bfloat16")
    modules = {name: mod for name, mod in m.model.named_modules() if isinstance(mod, QuantLinear)}
    assert len(modules) == 7 * m.config.num_hidden_layers  # every decoder linear is quantized, lm_head is not
    for name, mod in modules.items():
        state = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        theirs = PackedQuantizationCompressor.decompress(state, their)["weight"]
        assert torch.equal(mod.FORMAT.dequantize(mod.weight_q(), theirs.dtype), theirs), name
    text = m.generate("def fib(n):", max_new_tokens=8)
    assert text.strip()
