"""qwen2q's quantizers next to the peers', on one model, one text and the same windows.

\b
    python dev compare-peers MODEL_DIR [--dataset auto|wikitext2|pydoc|PATH] [--seq-len 2048]
        [--max-windows N] [--json OUT] [--only ROW,ROW] [--work-dir DIR]
        [--with-autoawq] [--autoawq-dtype float32] [--autoawq-stock] [--calib PATH] [--calib-samples 128]
        [--calib-seq-len 512] [--calib-cut 0] [--reference-cache DIR]

--dataset, --seq-len, --max-windows and --json are `qwen2q eval`'s options, with its defaults (every
window of 2048 tokens); the recorded runs (peers/README.md) pass --seq-len 512 --max-windows 32 or 128.

\b
Rows (names for --only):
  transformers-bf16   the same bf16 checkpoint run by transformers: the implementation floor of every
                      transformers row (what KL two correct bf16 implementations already show)
  qwen2q-nf4 / qwen2q-int8 / qwen2q-int4-g128   `qwen2q quantize` (round to nearest), run by qwen2q
  qwen2q-awq-g128     qwen2q's calibrated AWQ with `--rounding nearest` (AutoAWQ's algorithm), on --calib
  qwen2q-awq-gptq-g128  the same AWQ scales, then GPTQ rounding instead of clip search + round to nearest
                      (`CalibrationSettings(rounding="gptq")`; "not available" where qwen2q lacks it)
  bnb-nf4             transformers + bitsandbytes NF4, double quant, compute dtype bf16, quantized at load
  bnb-int8            transformers + bitsandbytes LLM.int8 (`load_in_8bit=True`), quantized at load
  autoawq-g128        AutoAWQ 0.2.9 (w_bit 4, g128, zero point, GEMM), opt-in with --with-autoawq;
                      its checkpoint is run by qwen2q (same layout as qwen2q-int4).  On a CPU-resident model
                      AutoAWQ's scale search corrupts the weights (its backup `{k: v.cpu()}` of the inspected
                      module's state dict aliases the live tensors, which `weight.mul_(scales)` then scales in
                      place, so every "restore" leaves W * s(ratio 0) and the saved layers are off by that
                      factor, in fp16 and fp32 alike); the row backs up copies instead (--autoawq-stock: don't)
  llmcompressor-awq-g128  llm-compressor 0.14 `oneshot` with AWQModifier + W4A16_ASYM (group 128, lm_head
                      kept), on the same calibration blocks; its in-memory model (weights fake-quantized
                      once with its own scales and zero points) is run by transformers; size and bits/w are
                      those of its pack-quantized tensors (compressed-tensors' compressor, not saved); on a
                      CPU-only torch its `IntermediatesCache.pin_memory` (llmcompressor.pipelines.cache) is a
                      no-op here (pinning needs an accelerator)

Protocol: the text is tokenized once with MODEL_DIR's tokenizer and cut into non-overlapping windows
(`qwen2q.evals.perplexity.windows`); the bf16 model, loaded by qwen2q, is the reference of every row
(`qwen2q.evals.drift.compare`: perplexity, KL(reference || row), top-1 agreement).  The reference runs once:
its logits per window are kept on disk in the work directory (bf16 logits, stored exactly) and
replayed for each row, so memory holds one model at a time and every row sees identical reference
figures (disk: seq_len * vocab * 2 bytes a window, 150 MiB for Qwen2 at 512; the default work
directory is temporary and removed at the end).  Rows run one at a time; each is deleted before the next.  Every row computes in the
checkpoint's dtype.  A row whose peer is not installed (or not opted in) is reported with the reason,
never fatal; a row that fails is reported with its error and the exit status is 1.

Columns: ± se = one standard error of the perplexity delta over windows (`qwen2q.evals.drift`; each row's
per-window NLL and KL are in the JSON, for `python dev paired` to compare two rows window by window); bits/w = bytes of the stored tensors of the quantized linears (codes, scales, zeros, statistics;
bias excluded) * 8 / their weight count; size = bytes of all stored tensors (what the checkpoint holds,
tied lm_head once); quant s = wall time to quantize (qwen2q: `qwen2q.quantize` to disk; transformers: load +
quantize in memory; AutoAWQ: `quantize()` including calibration; llm-compressor: `oneshot`); cpu s = CPU
seconds (user + system, this process and its waited-for children) over the same span: on a shared
machine wall time also counts the other jobs, CPU time does not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import click
import torch

import qwen2q
from qwen2q.architecture import LINEAR_NAMES
from qwen2q._version import __version__
from qwen2q.checkpoint import iter_tensors, weight_files
from qwen2q.cli_options import dataset_option, json_option, max_windows_option, seq_len_option
from qwen2q.config import Qwen2Config
from qwen2q.destination import SIDE_FILES
from qwen2q.quantization import quantize
from qwen2q.errors import Qwen2qError
from qwen2q.evals.data import load_text
from qwen2q.evals.drift import compare
from qwen2q.evals.harness import choose_seq_len
from qwen2q.evals.perplexity import perplexity, windows
from qwen2q.evals.table import Column
from qwen2q.evals.table import format_table as render_table
from qwen2q.loader import parse_dtype
from qwen2q.qconfig import QuantConfig
from qwen2q.tokenizer import Tokenizer

GROUP_SIZE = 128
AVX512_NOTE = ("bitsandbytes' AVX512-BF16 CPU fast path switched off on every Linear4bit: it repacks NF4 and "
               "rounds absmax to bf16, an approximation its GPU path does not make")


class Unavailable(Exception):
    """The row's peer is not installed, not implemented yet, or not opted in; the message says which."""


@dataclasses.dataclass
class Candidate:
    """One quantized model ready to evaluate.  forward: input_ids [1, T] -> logits [1, T, V]."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]  # its stored tensors, for size and bits/w
    quantize_seconds: float | None
    load_seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    quantize_cpu_seconds: float | None = None


@dataclasses.dataclass
class Context:
    src: Path
    work: Path
    dtype: torch.dtype
    args: types.SimpleNamespace  # the command's options, by parameter name
    _calib: torch.Tensor | None = None

    def calibration_ids(self) -> torch.Tensor:
        """[samples, calib_seq_len] token blocks shared by every calibrated row (computed once)."""
        if self._calib is None:
            self._calib = calibration_blocks(self.args.calib, Tokenizer(self.src), self.args.calib_samples,
                                             self.args.calib_seq_len, cut=self.args.calib_cut)
        return self._calib


def default_calib() -> Path:
    """The calibration text `qwen2q quantize -m awq` uses by default (`qwen2q.calibrate.data.default_source`);
    where there is none, the path it would have, so that the AWQ rows' "not found" names it."""
    from qwen2q.calibrate.data import default_source

    found = default_source()
    if found is not None:
        return Path(found)
    from qwen2q.textdata import data_folder

    return (data_folder() or Path("$QWEN2Q_DATA")) / "calib" / "wiki.utf8"


def load_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """qwen2q's model of checkpoint `path` on the CPU in `dtype` (`qwen2q.load`): input_ids -> logits."""
    return qwen2q.load(path, device="cpu", dtype=dtype).model


def calibration_blocks(path: Path, tokenizer: Tokenizer, samples: int, seq_len: int, cut: int = 0) -> torch.Tensor:
    """Tokens cut * n .. (cut + 1) * n - 1 (n = `samples` * `seq_len`; cut 0 = the first n) of the text file
    `path` (WikiExtractor <doc> tag lines removed), as [samples, seq_len] int64: AutoAWQ's
    concatenate-and-recut protocol, with no sample dropped.  Later cuts are disjoint runs of the same text,
    to measure how much a row's figures move with the calibration sample."""
    if not Path(path).is_file():
        raise Unavailable(f"calibration text {path} not found (pass --calib PATH)")
    text = re.sub(r"(?m)^</?doc\b[^\n]*\n?", "", Path(path).read_text(encoding="utf-8"))
    if cut < 0:
        raise Qwen2qError(f"--calib-cut must be 0 or more, not {cut}")
    need = (cut + 1) * samples * seq_len
    chars = need * 6
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise Qwen2qError(f"{path} has {len(ids)} tokens, fewer than (--calib-cut + 1) * --calib-samples * "
                          f"--calib-seq-len = {need}")
    return torch.tensor(ids[need - samples * seq_len:need], dtype=torch.long).view(samples, seq_len)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that were waited for, so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    """Wall and CPU seconds of a `with` block: `.wall`, `.cpu`."""

    def __enter__(self):
        self.wall = self.cpu = None
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu
        return False


# ---- rows -------------------------------------------------------------------------------------------

def _checkpoint_tensors(path: Path):
    return lambda: iter_tensors(weight_files(path))


def _qwen2q_load(path: Path, ctx: Context, clock: Clock, notes=()) -> Candidate:
    t0 = time.perf_counter()
    model = load_model(path, dtype=ctx.dtype)
    return Candidate(model, _checkpoint_tensors(path), clock.wall, time.perf_counter() - t0, list(notes), clock.cpu)


def qwen2q_rtn(method: str) -> Callable[[Context], Candidate]:
    def build(ctx: Context) -> Candidate:
        dst = ctx.work / f"qwen2q-{method}"
        with Clock() as clock:
            quantize(ctx.src, dst, QuantConfig(method, group_size=GROUP_SIZE), force=True, progress=False)
        note = "weight-only int8 (bf16 activations)" if method == "int8" else "round to nearest"
        return _qwen2q_load(dst, ctx, clock, [note])
    return build


def qwen2q_awq(rounding: str = "nearest") -> Callable[[Context], Candidate]:
    """qwen2q's calibrated AWQ on the same calibration blocks AutoAWQ gets; `rounding` "gptq" swaps the clip
    search and round to nearest for GPTQ rounding (a CalibrationSettings field newer qwen2q versions have)."""
    def build(ctx: Context) -> Candidate:
        try:
            from qwen2q.calibrate.pipeline import CalibrationSettings
        except ImportError as e:
            raise Unavailable(f"qwen2q.calibrate has no AWQ pipeline here ({e})") from None
        extra = {}
        if "rounding" in {f.name for f in dataclasses.fields(CalibrationSettings)}:
            extra["rounding"] = rounding  # always explicit: the default changed to gptq
        elif rounding != "nearest":
            raise Unavailable(f"this qwen2q's CalibrationSettings has no `rounding` (no {rounding} rounding yet)")
        calib = ctx.calibration_ids()
        dst = ctx.work / ("qwen2q-awq" if rounding == "nearest" else f"qwen2q-awq-{rounding}")
        settings = CalibrationSettings(ids=calib, **extra)
        with Clock() as clock:
            quantize(ctx.src, dst, QuantConfig("awq", group_size=GROUP_SIZE), settings, progress=False)
        ran = json.loads((dst / "config.json").read_text()).get("qwen2q", {}).get("compute_dtype", "float32")
        notes = [f"calibration: {_calib_label(ctx)}", f"rounding: {rounding}", f"calibration forwards in {ran}"]
        return _qwen2q_load(dst, ctx, clock, notes)
    return build


def _hf_state_tensors(model):
    """The model's state dict, each storage once (the tied lm_head shares the embedding's)."""
    def tensors():
        seen = set()
        for name, t in model.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                yield name, t
    return tensors


def _hf_candidate(ctx: Context, quantization_config=None, notes=()) -> Candidate:
    try:
        import accelerate  # noqa: F401  (transformers needs it for device_map and bitsandbytes)
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise Unavailable(f"transformers/accelerate not installed ({e.name}); pip install transformers accelerate") from None
    with Clock() as clock:
        model = AutoModelForCausalLM.from_pretrained(ctx.src, device_map="cpu", dtype=ctx.dtype,
                                                     quantization_config=quantization_config).eval()
    return _hf_wrap(model, clock.wall, clock if quantization_config else None, notes)


def _hf_wrap(model, load_seconds: float, clock: Clock | None, notes=(), tensors=None) -> Candidate:
    """A transformers model as a Candidate; `clock` times its quantization (None: not quantized)."""
    notes = list(notes)
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    if switched:
        notes.append(AVX512_NOTE)

    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits

    return Candidate(forward, tensors or _hf_state_tensors(model), clock.wall if clock else None, load_seconds,
                     notes, clock.cpu if clock else None)


def transformers_bf16(ctx: Context) -> Candidate:
    return _hf_candidate(ctx, notes=["not quantized: transformers' own bf16 forward (implementation floor)"])


def _bnb_config(**kw):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise Unavailable(f"{e.name} not installed; pip install bitsandbytes transformers accelerate") from None
    # LLM.int8 logs this on every matmul; the bnb-int8 row's notes say it once.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(lambda r: "MatMul8bitLt" not in r.getMessage())
    return BitsAndBytesConfig(**kw)


def bnb_nf4(ctx: Context) -> Candidate:
    cfg = _bnb_config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=ctx.dtype)
    return _hf_candidate(ctx, cfg, ["quantized by transformers at load (quant s includes the load)"])


def bnb_int8(ctx: Context) -> Candidate:
    cfg = _bnb_config(load_in_8bit=True)
    return _hf_candidate(ctx, cfg, ["LLM.int8: int8 activations, fp16 outlier path above 6.0; bitsandbytes casts "
                                    "bf16 inputs to fp16", "quantized by transformers at load (quant s includes the load)"])


def copying_backup(quantizer_cls):
    """AutoAWQ's quantizer with the weight backup of its scale search made of copies.

    `AwqQuantizer._compute_best_scale` backs the inspected module up as `{k: v.cpu() for k, v in
    module.state_dict().items()}` and, per grid ratio, runs `fc.weight.mul_(scales)` then
    `fc.weight.data = Q(fc.weight) / scales` and `load_state_dict(backup)`.  On CUDA `.cpu()` copies; on a
    CPU-resident model it returns the live tensor itself, so the in-place `mul_` scales the backup and every
    restore leaves W * s(ratio 0): ratios after the first are scored on corrupted weights (the search picks
    ratio 0) and the layer keeps that extra factor, which no norm compensates.  Here the backup is cloned."""
    class CopyingBackup(quantizer_cls):
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
            live = module2inspect.state_dict
            module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, *args, **kwargs)
            finally:
                del module2inspect.state_dict  # the class's method again
    return CopyingBackup


def autoawq(ctx: Context) -> Candidate:
    """AutoAWQ quantizes (calibrated, in --autoawq-dtype rather than its fp16 default, with its CPU weight
    backup fixed unless --autoawq-stock) and saves; qwen2q runs the saved GEMM checkpoint in the checkpoint's
    dtype (AutoAWQ's own kernels compute in fp16)."""
    if not ctx.args.with_autoawq:
        raise Unavailable("opt-in: pass --with-autoawq (AutoAWQ's quantize takes hours for 0.5B on a 2-core CPU)")
    try:
        from awq import AutoAWQForCausalLM
        from awq.quantize.quantizer import AwqQuantizer
    except ImportError as e:
        raise Unavailable(f"autoawq not installed ({e}); pip install autoawq==0.2.9 -c .ci/constraints.txt") from None
    calib = ctx.calibration_ids()
    dtype = getattr(torch, ctx.args.autoawq_dtype)
    dst = ctx.work / "autoawq"
    model = AutoAWQForCausalLM.from_pretrained(str(ctx.src), torch_dtype=dtype, device_map="cpu")
    patched = not ctx.args.autoawq_stock  # the copies cost nothing that matters on an accelerator either
    with Clock() as clock:
        model.quantize(None, quant_config={"zero_point": True, "q_group_size": GROUP_SIZE, "w_bit": 4, "version": "GEMM"},
                       calib_data=calib.tolist(), max_calib_samples=calib.shape[0], max_calib_seq_len=calib.shape[1],
                       quantizer_cls=copying_backup(AwqQuantizer) if patched else AwqQuantizer)
    if dst.exists():
        shutil.rmtree(dst)
    model.save_quantized(str(dst))
    del model
    gc.collect()
    for side in SIDE_FILES:
        if (ctx.src / side).is_file() and not (dst / side).exists():
            shutil.copy2(ctx.src / side, dst / side)
    notes = [f"AutoAWQ quantized in {ctx.args.autoawq_dtype}; calibration: {_calib_label(ctx)}; run by qwen2q"]
    if patched:
        notes.append("AutoAWQ's scale-search weight backup cloned (stock AutoAWQ corrupts CPU-resident layers)")
    else:
        notes.append("stock AutoAWQ (--autoawq-stock): on CPU its scale search corrupts the layers it scales")
    if dtype != ctx.dtype:
        notes.append(f"its checkpoint keeps the unquantized tensors in {ctx.args.autoawq_dtype} (size)")
    return _qwen2q_load(dst, ctx, clock, notes)


def _no_pin_memory(cache_cls):
    """llm-compressor's AWQ pins its cached layer inputs (`IntermediatesCache.pin_memory`) for faster
    host-to-device copies; a CPU-only torch cannot pin memory, so without an accelerator pinning is skipped."""
    if torch.cuda.is_available() or "pin_memory" not in vars(cache_cls):
        return contextlib.nullcontext()
    return _patched(cache_cls, "pin_memory", lambda self, batch_index, input_names=None: None)


@contextlib.contextmanager
def _patched(owner, name: str, value):
    old = vars(owner)[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _calibration_loader(calib: torch.Tensor):
    """The calibration blocks as the tokenized batches llm-compressor's `oneshot` takes as they are (a
    DataLoader bypasses its dataset loading and tokenization): one [1, seq_len] block per batch, in order."""
    from torch.utils.data import DataLoader

    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calib]
    return DataLoader(rows, batch_size=1, shuffle=False)


def _packed_tensors(model, compressor):
    """What llm-compressor would save for `model` (compressed-tensors pack-quantized): every quantized
    linear's state run through `compressor.compress` (int32-packed codes and zero points, scales, shape),
    every other tensor as it is."""
    quantized = {n: m for n, m in model.named_modules()
                 if getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None}

    def tensors():
        for name, t in _hf_state_tensors(model)():
            if name.rpartition(".")[0] not in quantized:
                yield name, t
        for owner, m in quantized.items():
            local = {k: v for k, v in m.state_dict().items() if "." not in k}
            for k, v in compressor.compress(local, m.quantization_scheme).items():
                yield f"{owner}.{k}", v
    return tensors


def _bake_fake_quant(model, forward_quantize) -> int:
    """Replace each quantized linear's weight by its fake-quantized value (what its quantized forward computes
    on every call) and switch the on-the-fly quantization off; returns how many linears were baked."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            scheme = getattr(m, "quantization_scheme", None)
            if getattr(scheme, "weights", None) is None:
                continue
            m.weight.data = forward_quantize(m, m.weight.data, "weight", scheme.weights)
            m.quantization_enabled = False
            n += 1
    return n


def llmcompressor_awq(ctx: Context) -> Candidate:
    """llm-compressor's AWQ (AWQModifier, then W4A16_ASYM group 128 with lm_head kept) on the shared
    calibration blocks; its model stays in memory, fake-quantized, and transformers runs it."""
    try:
        import accelerate  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise Unavailable(f"llm-compressor not installed ({e}); pip install 'llmcompressor==0.14.*' "
                          "-c .ci/constraints.txt") from None
    calib = ctx.calibration_ids()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ctx.src, dtype=ctx.dtype).eval()
    load_seconds = time.perf_counter() - t0
    recipe = [AWQModifier(),  # its defaults: duo scaling, 20-point grid
              QuantizationModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])]
    with _no_pin_memory(IntermediatesCache), Clock() as clock:
        oneshot(model=model, tokenizer=str(ctx.src), dataset=_calibration_loader(calib), recipe=recipe,
                num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1])
    baked = _bake_fake_quant(model, forward_quantize)
    if not baked:
        raise RuntimeError("llm-compressor left no quantized linear")
    notes = [f"llm-compressor AWQModifier + W4A16_ASYM g{GROUP_SIZE} in {ctx.dtype}; calibration: {_calib_label(ctx)}",
             f"run by transformers: {baked} linears' weights fake-quantized with llm-compressor's scales and zero "
             "points; size and bits/w: its pack-quantized tensors (computed, not saved)"]
    return _hf_wrap(model, load_seconds, clock, notes, _packed_tensors(model, PackedQuantizationCompressor))


def _calib_label(ctx: Context) -> str:
    cut = ctx.args.calib_cut
    where = f" (cut {cut}: from token {cut * ctx.args.calib_samples * ctx.args.calib_seq_len})" if cut else ""
    return f"{ctx.args.calib_samples} x {ctx.args.calib_seq_len} tokens of {Path(ctx.args.calib).name}{where}"


ROWS: dict[str, tuple[str, Callable[[Context], Candidate]]] = {
    "transformers-bf16": ("transformers bf16", transformers_bf16),
    "qwen2q-nf4": ("qwen2q nf4", qwen2q_rtn("nf4")),
    "bnb-nf4": ("transformers+bnb nf4", bnb_nf4),
    "qwen2q-int8": ("qwen2q int8", qwen2q_rtn("int8")),
    "bnb-int8": ("transformers+bnb int8", bnb_int8),
    "qwen2q-int4-g128": ("qwen2q int4 g128", qwen2q_rtn("int4")),
    "qwen2q-awq-g128": ("qwen2q awq g128", qwen2q_awq()),
    "qwen2q-awq-gptq-g128": ("qwen2q awq+gptq g128", qwen2q_awq("gptq")),
    "autoawq-g128": ("AutoAWQ g128", autoawq),
    "llmcompressor-awq-g128": ("llm-compressor awq g128", llmcompressor_awq),
}


# ---- measuring --------------------------------------------------------------------------------------

def linear_weight_counts(config: Qwen2Config) -> dict[str, int]:
    """Module name -> weight count of every decoder linear (the ones each method quantizes)."""
    with torch.device("meta"):
        from qwen2q.model import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(config)
    return {n: m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES}


def storage_figures(tensors: Iterable[tuple[str, torch.Tensor]], linears: dict[str, int]) -> tuple[int, float]:
    """(bytes of all `tensors`, bits per weight of the tensors stored for the `linears`, bias excluded).

    A tensor belongs to the linear whose module name prefixes its name: `P.weight`, `P.weight.absmax`,
    `P.SCB`, `P.qweight`, ... all count for module `P`."""
    total = linear_bytes = 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        total += size
        parts = name.split(".")
        if parts[-1] != "bias" and any(".".join(parts[:k]) in linears for k in range(len(parts) - 1, 0, -1)):
            linear_bytes += size
    return total, 8 * linear_bytes / sum(linears.values())


class ReferenceLogits:
    """The reference's logits, computed once per window and replayed from disk.

    `record(model)` returns a callable that stores each window's logits (in the model's own output dtype,
    so exactly) under a hash of the window's ids, or loads them instead of running `model` when a
    window was recorded before (by an earlier run given the same --reference-cache: files are written to a
    temporary name and renamed, so a concurrent run never reads half a file); the instance itself is the
    replaying callable, input_ids [1, T] -> logits [1, T, V], for `evals.drift.compare`.  `folder` must
    belong to one reference model (`reference_key` names it).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.reused = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _file(self, ids: torch.Tensor) -> Path:
        return self.folder / (hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest() + ".pt")

    def record(self, model):
        def forward(ids):
            files = [self._file(ids[i : i + 1]) for i in range(ids.shape[0])]
            if all(f.is_file() for f in files):
                self.reused += len(files)
                return torch.cat([torch.load(f, weights_only=True) for f in files])
            logits = model(ids)
            for i, f in enumerate(files):
                tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
                torch.save(logits[i : i + 1].clone(), tmp)
                os.replace(tmp, f)
            return logits
        return forward

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.load(self._file(ids), weights_only=True)


def reference_key(src: Path, dtype: torch.dtype) -> str:
    """A folder name for one reference model: its resolved path, dtype and weight files' sizes and mtimes."""
    parts = [str(Path(src).resolve()), str(dtype)]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in weight_files(Path(src))]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _progress(label: str, total: int):
    state = {"done": 0, "t0": time.perf_counter()}
    every = max(1, total // 8)

    def tick():
        state["done"] += 1
        if state["done"] % every == 0 or state["done"] == total:
            _log(f"  {label}: window {state['done']}/{total} ({time.perf_counter() - state['t0']:.0f} s)")
    return tick


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(args: types.SimpleNamespace, work: Path) -> dict:
    """Evaluate the rows `args.only` (default: all) of checkpoint `args.model` against it, keeping checkpoints
    and reference logits under `work`: {"settings": ..., "rows": [...]} as written by --json."""
    src = args.model
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    config = Qwen2Config.from_file(Path(src) / "config.json")
    seq_len = choose_seq_len(args.seq_len, config)
    text = load_text(args.dataset)
    ids = torch.tensor(Tokenizer(src).encode(text.text), dtype=torch.long)
    n_windows = windows(ids, seq_len, args.max_windows).shape[0]
    linears = linear_weight_counts(config)
    settings = {
        "model": str(src), "dataset": text.name, "source": text.source, "text_tokens": int(ids.numel()),
        "seq_len": seq_len, "windows": n_windows, "scored_tokens": n_windows * (seq_len - 1),
        "reference": "qwen2q, checkpoint dtype", "dtype": config.dtype, "group_size": GROUP_SIZE,
        "calibration": {"path": str(args.calib), "samples": args.calib_samples, "seq_len": args.calib_seq_len,
                        "cut": args.calib_cut,
                        "autoawq_dtype": args.autoawq_dtype, "with_autoawq": args.with_autoawq,
                        "autoawq_stock": args.autoawq_stock},
        "versions": {"qwen2q": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     **{d: _version(d) for d in ("transformers", "accelerate", "bitsandbytes", "autoawq", "llmcompressor",
                                                  "compressed-tensors")}},
        "torch_threads": torch.get_num_threads(), "started": started,
    }
    ctx = Context(Path(src), work, parse_dtype(None, config.dtype), args)
    reference = ReferenceLogits((args.reference_cache or work / "reference-logits") / reference_key(src, ctx.dtype))

    _log(f"reference: {src} on {text.name}, {n_windows} windows of {seq_len}")
    t0 = time.perf_counter()
    ref_model = load_model(src, dtype=ctx.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = perplexity(reference.record(ref_model), ids, seq_len, max_windows=n_windows, batch_size=1)
    size, bits = storage_figures(iter_tensors(weight_files(Path(src))), linears)
    if reference.reused:
        _log(f"reference: {reference.reused} windows' logits reused from {reference.folder}")
    rows = [{"row": "reference", "label": f"reference ({config.dtype})", "status": "ok", "ppl": r["ppl"],
             "bits_per_weight": bits, "size_bytes": size, "load_seconds": load_s,
             "eval_seconds": time.perf_counter() - t0, "notes": ["qwen2q, not quantized"]}]
    del ref_model
    gc.collect()

    for name in args.only or list(ROWS):
        label, build = ROWS[name]
        row = {"row": name, "label": label}
        _log(f"{name}: quantize and load")
        try:
            cand = build(ctx)
        except Unavailable as e:
            rows.append({**row, "status": f"not available: {e}"})
            _log(f"{name}: not available: {e}")
            continue
        except Exception as e:  # noqa: BLE001  one row's failure must not lose the other rows
            rows.append({**row, "status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            _log(f"{name}: failed\n{traceback.format_exc()}")
            continue
        try:
            size, bits = storage_figures(cand.tensors(), linears)
            t0 = time.perf_counter()
            d = compare(reference, cand.forward, ids, seq_len, max_windows=n_windows, progress=_progress(name, n_windows))
            row.update(status="ok", ppl=d["ppl"], ppl_delta=d["ppl_delta"], ppl_ratio=d["ppl_ratio"], kl=d["kl"],
                       top1=d["top1"], ppl_reference=d["ppl_reference"], ppl_delta_se=d["ppl_delta_se"],
                       window_nll=d["window_nll"], window_nll_reference=d["window_nll_reference"],
                       window_kl=d["window_kl"], bits_per_weight=bits, size_bytes=size,
                       quantize_seconds=cand.quantize_seconds, quantize_cpu_seconds=cand.quantize_cpu_seconds,
                       load_seconds=cand.load_seconds,
                       eval_seconds=time.perf_counter() - t0, notes=cand.notes)
        except Exception as e:  # noqa: BLE001
            row.update(status=f"failed: {type(e).__name__}: {e}", traceback=traceback.format_exc())
            _log(f"{name}: failed\n{traceback.format_exc()}")
        rows.append(row)
        del cand
        gc.collect()
    settings["total_seconds"] = time.perf_counter() - t_start
    return {"settings": settings, "rows": rows}


COLUMNS = [Column("row", "label"), Column("bits/w", "bits_per_weight", "{:.3f}"), Column("size MiB", "size_mib", "{:.1f}"),
           Column("ppl", "ppl", "{:.4f}"), Column("delta", "ppl_delta", "{:+.4f}"), Column("± se", "ppl_delta_se", "{:.3f}"),
           Column("KL", "kl", "{:.5f}"), Column("top-1", "top1", "{:.2%}"), Column("quant s", "quantize_seconds", "{:.1f}"),
           Column("cpu s", "quantize_cpu_seconds", "{:.1f}")]


def format_table(result: dict) -> str:
    """The settings line, one table row per row (a row that did not run says why), then each row's notes."""
    s = result["settings"]
    rows, notes = [], []
    for row in result["rows"]:
        if row["status"] != "ok":
            rows.append((row["label"], row["status"]))
            continue
        rows.append({**row, "size_mib": row["size_bytes"] / 2**20})
        notes += [f"  {row['label']}: {n}" for n in row.get("notes", [])]
    settings = (f"{s['dataset']} ({s['source']}): seq len {s['seq_len']}, {s['windows']} windows, "
                f"{s['scored_tokens']} scored tokens; reference: bf16 checkpoint run by qwen2q, every row in {s['dtype']}")
    return "\n".join([settings, render_table(COLUMNS, rows)] + (["notes:"] + notes if notes else []))


def _row_names(ctx, param, value: str | None) -> list[str] | None:
    """--only's comma-separated row names, each checked against ROWS (bad usage otherwise)."""
    if not value:
        return None
    names = [r.strip() for r in value.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise click.BadParameter(f"unknown row(s) {', '.join(unknown)}; choose among {', '.join(ROWS)}")
    return names


@click.command("compare-peers", help=__doc__)
@click.argument("model", type=click.Path(path_type=Path))
@dataset_option
@seq_len_option
@max_windows_option
@json_option
@click.option("--only", default=None, callback=_row_names, metavar="ROW,ROW",
              help=f"Comma-separated rows among: {', '.join(ROWS)} (default: all).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Keep checkpoints and reference logits here (default: a temporary folder, removed).")
@click.option("--reference-cache", type=click.Path(path_type=Path), default=None,
              help="Keep the reference logits here and reuse them in later runs on the same model and windows "
                   "(default: inside the work directory); seq_len * vocab * 2 bytes a window.")
@click.option("--with-autoawq", is_flag=True, help="Run the AutoAWQ row (slow: hours for 0.5B on a 2-core CPU).")
@click.option("--autoawq-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]),
              help="dtype AutoAWQ quantizes in (AutoAWQ's own default is fp16).")
@click.option("--autoawq-stock", is_flag=True,
              help="Run AutoAWQ's quantizer unpatched (on CPU its scale search corrupts the weights).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the AWQ rows (default: the one `qwen2q quantize -m awq` uses).")
@click.option("--calib-samples", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--calib-cut", default=0, show_default=True, type=click.IntRange(min=0),
              help="Take the K-th run of samples x seq-len tokens of --calib (0: the first); disjoint cuts show "
                   "how far a calibrated row moves with its calibration sample.")
def command(json_out, work_dir, **options) -> int:
    args = types.SimpleNamespace(**options)
    args.calib = args.calib or default_calib()
    work = work_dir or Path(tempfile.mkdtemp(prefix="qwen2q-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(format_table(result))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_out}")
    return 1 if any(r["status"].startswith("failed") for r in result["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    """`python dev compare-peers ARGV` in this process (see `qwen2q_dev.cli.main`)."""
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)
