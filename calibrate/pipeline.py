"""Calibrated quantization, one decoder layer at a time: the layer-wise path of `qwen2q.quantize` for
recipes whose algorithms need calibration (`qwen2q.recipe`: awq, awq-gptq, awq-scales, gptq).

Per layer: capture its inputs, search and fold AWQ's scales where the linears' algorithms ask for it
(`awq.py`), then round every linear onto its format's grid: with GPTQ's error feedback (`gptq.py`), or
with AWQ's clip search and round-to-nearest, or to nearest alone.  Each linear's format supplies what
the searches score (`Format.fake_quantize`), its scale groups and its GPTQ grid, so nothing here is
tied to int4: AWQ int4 and AWQ scales in front of NF4 are two recipes of the same code.

Precision: the layer's weights, folded scales, statistics (mean |x|, X^T X) and GPTQ are fp32; the
forwards (capture, scale search, next layer's input) run under bf16 autocast, as the model runs in
inference, where bf16 matmuls are native: on Qwen2.5-Coder-0.5B (a CPU with AVX-512) that cut the CPU time
by 43% and raised KL by 0.0015 (0.0668 -> 0.0683, mean of three calibration cuts).  Elsewhere (an AVX2-only
CPU, where bf16 GEMMs are 6x slower than fp32) the default "auto" runs all fp32, as `compute_dtype="float32"`
always does (`resolve_compute_dtype`).

Memory: only one decoder layer's weights are on the compute device at once, read from the memory-mapped
source shards on demand; the calibration activations (N x L x hidden, fp32) live on the device; the
output streams into shards like every other conversion.  Each layer's quantized output feeds the next
layer, so later layers calibrate on the activations they will really see.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch

from qwen2q.architecture import HEAD, LINEAR_INPUT, LINEARS, SCALE_GROUPS
from qwen2q.architecture import INPUT_READER as HOOKED
from qwen2q.calibrate.awq import NO_CLIP, apply_clip, fold_scales, search_clip, search_scales
from qwen2q.calibrate.data import calibration_tokens
from qwen2q.calibrate.gptq import gptq_round, inverse_factor
from qwen2q.checkpoint import TensorIndex, check_filled, fill_module
from qwen2q.errors import Qwen2qError
from qwen2q.model import DecoderLayer
from qwen2q.recipe import Choice
from qwen2q.rope import RotaryEmbedding
from qwen2q.tokenizer import Tokenizer


@dataclasses.dataclass
class CalibrationSettings:
    """Where the calibration tokens come from and how the layer forwards run."""

    source: str | None = None  # file, folder or hub id; None: ../shared/data/calib/wiki.utf8
    samples: int = 128
    seq_len: int = 512
    chat_template: bool = False
    search_tokens: int = 4096  # tokens the scale search scores (statistics use all of them)
    ids: torch.Tensor | None = None  # ready-made int64 [samples, seq_len] tokens instead of `source`
    feed: str = "quantized"  # next layer's input: the quantized layer's output, or "float" (AutoAWQ's choice)
    # --method awq only (a Recipe's rules name their algorithms): after scaling, "gptq" error feedback (the
    # default) or "nearest" (clip search + round to nearest: AutoAWQ's AWQ exactly; the only choice for nf4)
    rounding: str | None = None
    act_order: bool = False  # gptq: sweep columns by decreasing input energy, group grids fixed up front
    # the layer forwards (capture, scale search, feed): one of COMPUTE_DTYPES, or "auto" (`resolve_compute_dtype`)
    compute_dtype: str = "auto"
    # held-out windows (after the samples in the text; with `ids`, its last rows) that run through both the
    # source and the quantized layers, for the result's KL against the source (`LayerCalibrator.holdout_kl`)
    holdout: int = 0
    # the text the held-out windows are cut from (file, folder or hub id, its first `holdout` x seq_len
    # tokens); None: the calibration text, after the samples
    holdout_source: str | None = None
    # the held-out KL's 95% upper bound (`sensitivity.upper_bound`) above this aborts the run before anything
    # is installed
    max_holdout_kl: float | None = None


COMPUTE_DTYPES = ("bfloat16", "float32")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run on native kernels on `device`: CUDA with bf16 support, or a CPU whose oneDNN
    takes bf16 (AVX-512 and up).  On an AVX2-only CPU torch's bf16 GEMM falls back to a scalar, one-thread
    loop: measured on a 2-core AMD EPYC, 6x slower than fp32 forward and about 300x slower backward."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def resolve_compute_dtype(dtype: str, device: torch.device) -> str:
    """`dtype` as the forwards will run it: "auto" is bfloat16 where bf16 matmuls are native (`native_bf16`:
    bf16 forwards as inference runs them, and faster), float32 elsewhere; any other value unchanged."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


def forward_precision(device: torch.device, dtype: str):
    """Context for the calibration forwards: bf16 autocast (matmuls, attention in bf16 with fp32
    accumulation, as the checkpoint runs in inference) or plain fp32.  Weights, folded scales, statistics
    sums and GPTQ stay fp32 either way; never fp16."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def load_layer(index: TensorIndex, config, i: int, device) -> DecoderLayer:
    """Decoder layer `i` in fp32 on `device`, read from the source shards."""
    with torch.device("meta"):
        layer = DecoderLayer(config, i)
    prefix = f"model.layers.{i}."
    tensors = ((n[len(prefix):], index.get(n)) for n in index.names() if n.startswith(prefix))
    fill_module(layer, tensors, torch.float32, device)
    check_filled(layer)
    return layer


class _Recorder:
    """Forward pre-hook that sums |input| per channel (and X^T X when `gram` is set) and keeps the
    inputs while `keeping` is set."""

    def __init__(self, gram: bool = False):
        self.total, self.count, self.kept, self.keeping = 0.0, 0, [], False
        self.gram = 0.0 if gram else None

    def __call__(self, module, args):
        a = args[0]
        flat = a.reshape(-1, a.shape[-1]).float()
        self.total = self.total + flat.abs().double().sum(0)
        self.count += flat.shape[0]
        if self.gram is not None:
            with torch.autocast(flat.device.type, enabled=False):  # X^T X in fp32 even inside a bf16 forward
                self.gram = self.gram + flat.t() @ flat
        if self.keeping:
            self.kept.append(a.clone())


@torch.no_grad()
def capture(layer: DecoderLayer, x: torch.Tensor, cos, sin, n_search: int, grams: bool = False):
    """Run `layer` over x [N, L, H] in batches of samples.

    Returns (means, inputs, grams): for each activation kind of HOOKED, mean |input| per channel (fp32
    [C], over all N x L tokens); the activations of n_search samples spread evenly over the N: attn_in
    [n, L, H] (the attention needs whole sequences), the others flattened to [n * L, C]; and, when
    `grams` is set, X^T X (fp32 [C, C], over all tokens), else None.
    """
    keep = set(torch.linspace(0, x.shape[0] - 1, n_search).round().long().tolist())
    recorders = {kind: _Recorder(grams) for kind in HOOKED}
    hooks = [layer.get_submodule(HOOKED[k]).register_forward_pre_hook(r) for k, r in recorders.items()]
    try:
        for b in range(x.shape[0]):  # one sample at a time, so the kept ones can be any
            for r in recorders.values():
                r.keeping = b in keep
            layer(x[b : b + 1], cos, sin)
    finally:
        for h in hooks:
            h.remove()
    means = {k: (r.total / r.count).float() for k, r in recorders.items()}
    inputs = {}
    for kind, r in recorders.items():
        kept = torch.cat(r.kept)
        inputs[kind] = kept if kind == "attn_in" else kept.reshape(-1, kept.shape[-1])
    return means, inputs, ({k: r.gram for k, r in recorders.items()} if grams else None)


@torch.no_grad()
def run_layer(layer: DecoderLayer, x: torch.Tensor, cos, sin, batch: int = 8) -> torch.Tensor:
    return torch.cat([layer(x[b : b + batch], cos, sin) for b in range(0, x.shape[0], batch)])


def _inspector(layer: DecoderLayer, inspect: str, cos, sin):
    """inputs -> output of the module the loss scores (the attention block needs its rotary tables)."""
    module = layer.get_submodule(inspect)
    if inspect == "self_attn":
        return lambda x: module(x, cos, sin, None, 0)
    return module


def _fake_quantize(choice: Choice | None):
    """w [out, in] -> what the file will hold, fp32 (a linear kept in full precision: w itself)."""
    if choice is None:
        return lambda w: w
    return lambda w: choice.format.fake_quantize(w, choice.params)


@torch.no_grad()
def calibrate_layer(layer: DecoderLayer, x, cos, sin, choices: dict[str, Choice | None], search_tokens: int,
                    where: str, compute_dtype: str = "float32") -> tuple[dict, dict]:
    """Run each linear's algorithm on one layer in place: search and fold AWQ's scales for every scaling
    group one of whose linears asks for it, then GPTQ-round (leaving those linears on their grids) or
    clip-search the linears that ask for it.  choices: {linear name (e.g. "mlp.up_proj"): its Choice, or
    None for one kept in full precision}.  compute_dtype: the precision of the layer forwards (capture
    and scale search; `forward_precision`).

    Returns ({scaling group's previous op: alpha}, {linear name: its GPTQ grids, one per group}).
    """
    seq_len = x.shape[1]
    n_search = max(1, min(x.shape[0], math.ceil(search_tokens / seq_len)))
    precision = functools.partial(forward_precision, x.device, compute_dtype)
    gptq = [n for n, c in choices.items() if c is not None and c.algorithm.rounding == "gptq"]
    with precision():
        means, inputs, grams = capture(layer, x, cos, sin, n_search, grams=bool(gptq))
    chosen = {}
    for group in SCALE_GROUPS:
        quantized = [choices[n] for n in group.linears if choices[n] is not None]
        if not any(c.algorithm.scale_search for c in quantized):
            continue
        if group.needs_same_shape:
            prev, first = layer.get_submodule(group.prev), layer.get_submodule(group.linears[0])
            if prev.out_features != first.in_features:
                continue  # GQA: v's output is narrower than o's input, nothing to fold
        kind = group.input_kind
        first = layer.get_submodule(group.linears[0])
        group_size = quantized[0].format.scale_group(quantized[0].params, first.in_features)
        with precision():
            s, alpha, loss = search_scales(layer, group, means[kind], inputs[kind],
                                           _inspector(layer, group.inspect, cos, sin), group_size, where,
                                           [_fake_quantize(choices[n]) for n in group.linears])
        fold_scales(layer, group, s)
        inputs[kind] = inputs[kind] / s  # what the scaled linears now read
        if grams is not None:
            grams[kind] = grams[kind] / (s[:, None] * s[None, :])
        chosen[group.prev] = alpha
    grids, factors = {}, {}
    for name in gptq:
        lin, choice = layer.get_submodule(name), choices[name]
        grid = choice.format.grid(choice.params, lin.in_features)
        kind, act_order = LINEAR_INPUT[name], choice.algorithm.act_order
        try:
            if not act_order and kind not in factors:  # q/k/v and gate/up share one factorisation
                factors[kind] = inverse_factor(grams[kind])
            lin.weight.data, grids[name] = gptq_round(lin.weight.data, grams[kind], grid, act_order,
                                                      factor=None if act_order else factors[kind])
        except ValueError as e:
            raise Qwen2qError(f"{where} {name}: {e}") from None
    for name, choice in choices.items():
        if choice is None or not choice.algorithm.clip_search or name.rsplit(".", 1)[-1] in NO_CLIP:
            continue
        lin = layer.get_submodule(name)
        group_size = choice.format.scale_group(choice.params, lin.in_features)
        x_in = inputs[LINEAR_INPUT[name]].reshape(-1, lin.in_features)
        apply_clip(lin, search_clip(lin.weight.data, x_in, group_size, _fake_quantize(choice)), group_size)
    return chosen, grids


@torch.no_grad()
def quantize_layer(layer: DecoderLayer, i: int, choices: dict[str, Choice | None], source_dtype: torch.dtype,
                   grids: dict | None = None) -> tuple[dict, int, int]:
    """The checkpoint tensors of calibrated layer `i`: each linear in its format (stored on its GPTQ grids
    when it has them, else rounded to nearest, from the source dtype where the format says bitsandbytes
    would), its bias in the format's bias dtype; a linear kept in full precision, and the folded norms,
    in the source dtype.  The layer is left holding exactly what the file stores (dequantized weights,
    biases and norms rounded to their stored dtypes, in fp32), so the layer computes what the file will.  Returns (tensors on the CPU, quantized weights, their stored bytes)."""
    out, q_elems, q_bytes = {}, 0, 0
    prefix = f"model.layers.{i}."
    for name in LINEARS:
        lin, choice = layer.get_submodule(name), choices[name]
        if choice is None:
            out[prefix + name + ".weight"] = lin.weight.data.to(source_dtype)
            lin.weight.data = out[prefix + name + ".weight"].float()
            bias_dtype = source_dtype
        else:
            fmt = choice.format
            if name in (grids or {}):
                q = fmt.grid(choice.params, lin.in_features).encode(lin.weight.data, grids[name])
            else:
                q = fmt.quantize(lin.weight.data.to(source_dtype) if fmt.rounds_source_dtype else lin.weight.data,
                                 choice.params)
            stored = fmt.to_state_dict(q, prefix + name)
            out.update(stored)
            q_elems += lin.weight.numel()
            q_bytes += sum(t.numel() * t.element_size() for t in stored.values())
            bias_dtype = fmt.bias_dtype or source_dtype
            lin.weight.data = fmt.dequantize(q, torch.float32)
        if lin.bias is not None:
            out[prefix + name + ".bias"] = lin.bias.data.to(bias_dtype)
            lin.bias.data = out[prefix + name + ".bias"].float()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[prefix + norm + ".weight"] = layer.get_submodule(norm).weight.data.to(source_dtype)
        layer.get_submodule(norm).weight.data = out[prefix + norm + ".weight"].float()
    return {k: v.cpu() for k, v in out.items()}, q_elems, q_bytes


def calibration_ids(src, settings: CalibrationSettings) -> tuple[torch.Tensor, str]:
    """The calibration tokens int64 [samples + holdout, seq_len] (the held-out windows last) and where they
    came from, in words."""
    if settings.ids is not None:
        ids = settings.ids.long()
        if settings.holdout >= ids.shape[0]:
            raise Qwen2qError(f"{ids.shape[0]} given samples leave none to calibrate on after {settings.holdout} "
                              "held-out windows")
        return ids, f"given tokens: {ids.shape[0] - settings.holdout} x {ids.shape[1]}"
    tokenizer = Tokenizer(src)
    if settings.holdout and settings.holdout_source is not None:
        ids, described = calibration_tokens(tokenizer, settings.source, settings.samples, settings.seq_len,
                                            settings.chat_template)
        held, held_described = calibration_tokens(tokenizer, settings.holdout_source, settings.holdout,
                                                  settings.seq_len, settings.chat_template)
        return torch.cat([ids, held]), f"{described} (held-out windows: {held_described})"
    ids, described = calibration_tokens(tokenizer, settings.source, settings.samples + settings.holdout,
                                        settings.seq_len, settings.chat_template)
    if settings.holdout:
        described = described.replace(f"{ids.shape[0]} x", f"{settings.samples} x", 1) + \
            f" (then {settings.holdout} held-out windows)"
    return ids, described


class LayerCalibrator:
    """Calibrates and quantizes decoder layers in order: `layer(i)` reads layer i from `index`, runs each
    linear's algorithm on the current activations, returns its checkpoint tensors and moves the
    activations through the quantized layer (or the float one, `settings.feed == "float"`).

    ids: calibration tokens int64 [N, L]; the embedding rows they use become the first activations
    (fp32 [N, L, hidden] on `device`).  Its last `settings.holdout` rows are held out: they run through
    each source layer and each quantized layer (two fp32 streams), for `holdout_kl`."""

    def __init__(self, index: TensorIndex, config, choices, settings: CalibrationSettings, ids: torch.Tensor,
                 device: torch.device, source_dtype: torch.dtype):
        self.index, self.config, self.choices, self.settings = index, config, choices, settings
        self.device, self.source_dtype = device, source_dtype
        seq_len = ids.shape[1]
        rotary = RotaryEmbedding(config.rope, config.head_dim).to(device)
        self.cos, self.sin = rotary(torch.arange(seq_len, device=device)[None], torch.float32, seq_end=seq_len)
        # only the rows used, never the table in fp32
        embed = index.get("model.embed_tokens.weight")
        held = settings.holdout
        self.x = embed[ids[: ids.shape[0] - held]].to(device, torch.float32)
        self.held_ids = ids[ids.shape[0] - held :] if held else None
        self.held_source = self.held_quantized = embed[self.held_ids].to(device, torch.float32) if held else None
        self.alphas: list[dict] = []
        self.quantized_head: torch.Tensor | None = None  # lm_head as `head` stored it, fp32 [vocab, hidden]

    def layer(self, i: int) -> tuple[dict, int, int]:
        """Layer i's checkpoint tensors, quantized weights and their stored bytes (`quantize_layer`)."""
        settings, x = self.settings, self.x
        layer = load_layer(self.index, self.config, i, self.device)
        self.index.release()  # unmap what this layer read, so host RSS does not grow layer by layer
        with forward_precision(self.device, settings.compute_dtype):
            next_x = run_layer(layer, x, self.cos, self.sin) if settings.feed == "float" else None
            if self.held_source is not None:
                self.held_source = run_layer(layer, self.held_source, self.cos, self.sin).float()
        choices = {name: self.choices(f"model.layers.{i}.{name}") for name in LINEARS}
        chosen, grids = calibrate_layer(layer, x, self.cos, self.sin, choices, settings.search_tokens,
                                        f"layer {i}", settings.compute_dtype)
        self.alphas.append(chosen)
        result = quantize_layer(layer, i, choices, self.source_dtype, grids)
        if next_x is None:  # feed "quantized": the quantized layer's output
            with forward_precision(self.device, settings.compute_dtype):
                next_x = run_layer(layer, x, self.cos, self.sin)
        if self.held_quantized is not None:
            with forward_precision(self.device, settings.compute_dtype):
                self.held_quantized = run_layer(layer, self.held_quantized, self.cos, self.sin).float()
        self.x = next_x.float()  # the residual stream stays fp32 between layers
        if not torch.isfinite(self.x).all():
            raise Qwen2qError(f"layer {i}: quantized layer output has NaN/Inf; stopping")
        return result

    @torch.no_grad()
    def head(self, choice: Choice) -> tuple[dict, int, int]:
        """lm_head's checkpoint tensors in `choice`'s format, once every layer has run: GPTQ-rounded (when
        the choice's algorithm rounds so; AWQ's scale search is left out: no op before lm_head but the final
        norm) through the gram of the final norm's output over the calibration activations as the
        quantized layers leave them, else rounded to nearest.  `holdout_kls` then scores the quantized
        stream through it.  Returns (tensors on the CPU, quantized weights, their stored bytes)."""
        from qwen2q.calibrate.sensitivity import final_gram, output_head

        norm, weight = output_head(self.index, self.config, self.device, "float32")
        self.index.release()
        fmt, params = choice.format, choice.params
        grid = fmt.grid(params, weight.shape[1])
        if grid is not None and choice.algorithm.rounding == "gptq":
            try:
                rounded, grids = gptq_round(weight, final_gram(norm, self.x), grid, choice.algorithm.act_order)
            except ValueError as e:
                raise Qwen2qError(f"{HEAD}: {e}") from None
            q = grid.encode(rounded, grids)
        else:
            q = fmt.quantize(weight.to(self.source_dtype) if fmt.rounds_source_dtype else weight, params)
        stored = fmt.to_state_dict(q, HEAD)
        self.quantized_head = fmt.dequantize(q, torch.float32)
        return ({k: v.cpu() for k, v in stored.items()}, weight.numel(),
                sum(t.numel() * t.element_size() for t in stored.values()))

    def holdout_kls(self) -> list[float]:
        """Each held-out window's mean KL(source || quantized) of the next-token distributions, at the
        positions `qwen2q.evals.drift` scores (each window's first L - 1), once every layer (and `head`,
        when lm_head is quantized) has run."""
        from qwen2q.calibrate.sensitivity import output_head, window_kls

        norm, head = output_head(self.index, self.config, self.device, self.settings.compute_dtype)
        other = None if self.quantized_head is None else self.quantized_head.to(head.dtype)
        kls = window_kls(norm, head, self.held_source, self.held_quantized, other)
        self.index.release()
        return kls

    def holdout_kl(self) -> float:
        """The mean over every scored held-out position (`holdout_kls`)."""
        kls = self.holdout_kls()
        return sum(kls) / len(kls)
