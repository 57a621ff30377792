"""The one-shot GPU check (issue 20): everything a lent H200 must confirm, in one run of <= 8 minutes.

\b
    python dev gpu-check [--parts env,correct,kernels,graph,e2e,cli,tests] [--budget 480] [--out DIR]
    python dev gpu-check --dry-run          # CPU: every part under the Triton interpreter, tiny shapes (CI)

On the lent H200 (the device tool; the calibration text copied beforehand into the git-ignored .gpu_carry/):
    run(command="python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 dev
        gpu-check --budget 450 2>&1 | tee $OUT/console.log", carry=[".gpu_carry"], timeout_s=540)
then copy the JSON and log from the reply's files into evals/results/ and commit them.

Parts, in order (each is skipped once the budget is spent, and stops adding cases past its own share; tests,
last, takes what is left):
    env      versions, the GPU, its copy bandwidth (read + write of a 1 GiB buffer) and bf16 matmul TFLOP/s
    correct  every format x path (M = 1; 2..16; 17..64; > 64; 2048) x bf16 / fp16 x bias or not, Qwen2-7B and
             72B projection shapes, odd shapes, group size 32, a strided x, the custom op: float64 reference on the
             device, outputs poisoned with NaN first, and split-K determinism
    graph    the CUDA-graph decode step against eager decoding, bit for bit, for every format on the embedded model;
             its logits with the fused layer steps (`qwen2q.fused`) against the plain PyTorch steps
    kernels  int4, NF4, int8 against bf16 at the Qwen2-7B shapes, M = 1, 16, 2048: median microseconds per call
             inside a CUDA graph whose calls cycle through weight copies larger than L2 together; GB/s, share of
             the measured copy bandwidth, speed-up; at M = 2048 also the fused GEMM the runtime does not choose;
             int4 beside its AWQ-layout path, other int4_decode tiles at M = 16, and at int4_decode.MAX_M (512)
             beside the dequantize + cuBLAS path that takes more rows; M = 1 and 16 also with the split-K
             finished in the kernel (variant "fixup", `splitk.FIXUP`), whose bits `correct` checks, and M = 1 unsplit
             (variant "no-split": no reduce launch, fewer programs); the decode
             step's attention kernel at 257 and 4096 cache positions, splits varied, against SDPA's masked path;
             int4 and bf16 at the grouped shapes an int4 model launches (q + k + v, gate + up) for M = 1 and 16
    e2e      a 28-layer random-weight model with Qwen2-7B's shapes built on the GPU: prefill and decode tokens/s
             and peak memory for bf16, int4, NF4, int8 (the code behind `qwen2q bench`), and transformers'
             `generate` decode on the same bf16 weights; bf16 and int4 also with the plain PyTorch layer steps
             (decode_tok_s_unfused) and the GPU kernels one decode step launches, both ways (the profiler); int4
             also with the split-K fix-up, and with lm_head in int4 too (head_int4)
    cli      `qwen2q quantize` for every method through the command line, the calibrated ones (awq, nf4
             --awq-scales: calibration text from .gpu_carry/calib.txt) with --device cuda, and `qwen2q bench
             --device cuda`; AWQ's CUDA output against its CPU output (KL on the embedded model)
    tests    tests/kernels with TRITON_INTERPRET=0: the interpreter suite, run on the GPU; tests/test_qlinear_held.py

After each part it writes OUT/gpu_check-<gpu>.json and appends to OUT/gpu_check-<gpu>.log, so a run cut short
still returns what it measured.  Nothing here asserts a speed: the JSON holds measurements to compare with
`python -m qwen2q.kernels.report`'s predictions (kernels/NOTES.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import click

PARTS = ("env", "correct", "kernels", "graph", "e2e", "cli", "tests")  # tests last: it takes what is left
SHARES = {"env": 0.06, "correct": 0.25, "kernels": 0.22, "graph": 0.05, "e2e": 0.2, "cli": 0.12, "tests": 1.0}
REPO = Path(__file__).resolve().parents[3]
SHAPES_7B = {"q_proj/o_proj": (3584, 3584), "k_proj/v_proj": (512, 3584), "gate_proj/up_proj": (18944, 3584),
             "down_proj": (3584, 18944)}  # (N, K)
GROUPED_7B = {"qkv (grouped)": (4608, 3584), "gate+up (grouped)": (37888, 3584)}  # (N, K)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


class Check:
    """The run: results by part, the log, the budget and the output files."""

    def __init__(self, out: Path, budget: float, dry_run: bool):
        import torch

        self.torch, self.dry_run, self.budget, self.start = torch, dry_run, budget, time.monotonic()
        self.device = torch.device("cpu" if dry_run else "cuda")
        name = "cpu-dry-run" if dry_run else torch.cuda.get_device_name(0)
        self.gpu = name
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-").lower()
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out / f"gpu_check-{slug}.json", out / f"gpu_check-{slug}.log"
        self.results: dict = {"gpu": name, "dry_run": dry_run, "parts": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        click.echo(line, err=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        self.results["seconds"] = round(self.elapsed(), 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.json_path)

    def run_part(self, name: str, fn) -> None:
        left = self.budget - self.elapsed()
        if left < 5:
            self.results["parts"][name] = {"status": "skipped: budget spent"}
            self.log(f"{name}: skipped, budget spent")
            self.save()
            return
        # A dry run checks the script, not the timing: its parts may take what is left of the budget.
        share = left if self.dry_run else min(left, max(SHARES[name] * self.budget, 20))
        deadline = time.monotonic() + share
        self.log(f"{name}: start ({left:.0f} s of budget left)")
        t0 = time.monotonic()
        try:
            result = fn(self, deadline)
            status = "ok"
        except Exception as e:  # a part that breaks must not take the others with it
            result, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}, "error"
        result["status"], result["seconds"] = status, round(time.monotonic() - t0, 1)
        self.results["parts"][name] = result
        if status == "ok":  # the top-level keys
            if name in ("env", "correct"):
                self.results[name] = result
            elif name == "kernels":
                self.results["kernels"] = result.get("rows", [])
            elif name == "e2e":
                self.results["e2e"] = {k: v for k, v in result.items() if isinstance(v, dict)}
                self.results["transformers_decode_tok_s"] = result.get("transformers_decode_tok_s")
        self.log(f"{name}: {status} in {result['seconds']} s" + (f" ({result['error']})" if status == "error" else ""))
        self.save()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- env

def part_env(c: Check, deadline: float) -> dict:
    import torch
    import triton

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__}
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if c.dry_run:
        return {**info, "copy_gbs": None, "bf16_tflops": None, "note": "dry run: no device timings"}
    props = torch.cuda.get_device_properties(0)
    info.update(name=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=getattr(props, "L2_cache_size", None))
    n = 2**30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10)
    info["copy_gbs"] = round(2 * n / (ms * 1e-3) / 1e9, 1)
    a, b = (torch.randn(8192, 8192, device="cuda").to(torch.bfloat16) for _ in range(2))
    ms = _median_ms(lambda: a @ b, 10)
    info["bf16_tflops"] = round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)
    return info


def _median_ms(fn, reps: int) -> float:
    """Median of `reps` timed calls (CUDA events), after three warm-up calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# -------------------------------------------------------------------------------------------------------- tests

def part_tests(c: Check, deadline: float) -> dict:
    if c.dry_run:
        return {"note": "dry run: CI runs tests/kernels under the interpreter itself"}
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    import importlib.util

    per_test = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *per_test, str(REPO / "tests" / "kernels"),
           str(REPO / "tests" / "test_qlinear_held.py")]  # the module holding int4's native layout, on CUDA
    try:
        done = subprocess.run(cmd, cwd="/tmp", env=env, capture_output=True, text=True,
                              timeout=max(10, deadline - time.monotonic()))
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # its output may come back as bytes even with text=True
        text = lambda v: v.decode(errors="replace") if isinstance(v, bytes) else (v or "")  # noqa: E731
        out, rc = text(e.stdout) + text(e.stderr), "timeout"
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {"returncode": rc, "summary": summary[-1] if summary else None, "tail": out[-3000:]}


# ------------------------------------------------------------------------------------------------------ correct

def _weight(fmt: str, N: int, K: int, device, seed: int):
    """A random W [N, K] quantized on the device in `fmt` ("int4-g128", "int4-g32", "nf4", "int8"), and W as its
    format dequantizes it (fp32)."""
    import torch

    from qwen2q.quantizers import int4, int8, nf4

    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn(N, K, generator=g) * 0.02 + 1e-3).to(torch.bfloat16).to(device)
    if fmt.startswith("int4"):
        q = int4.quantize(dense, *int4.compute_scales_zeros(dense, int(fmt.rpartition("g")[2])))
        return q, int4.dequantize(q, torch.float32)
    module = {"nf4": nf4, "int8": int8}[fmt]
    q = module.quantize(dense)
    return q, module.dequantize(q, torch.float32)


def _call(fmt: str, x, q, bias, out, native=None):
    from qwen2q.kernels import triton_ops

    if fmt.startswith("int4"):
        return triton_ops.int4_linear(x, q, bias, out=out, native=native)
    return getattr(triton_ops, f"{fmt}_linear")(x, q, bias, out=out)


def _close(y, x, W, bias, dtype_name: str) -> str | None:
    """None when y matches x @ W^T + bias (float64 on the device) within the interpreter tests' bound: normwise
    <= 2u, every element within 2u |ref| + 4u rms(ref); else what failed."""
    ref = x.double() @ W.double().t()
    if bias is not None:
        ref = ref + bias.double()
    y = y.double().reshape(ref.shape)
    if not bool(y.isfinite().all()):
        return f"{int((~y.isfinite()).sum())} outputs not written or not finite"
    u = UNIT_ROUNDOFF[dtype_name]
    err = y - ref
    normwise = (err.norm() / ref.norm()).item()
    worst = (err.abs() / (2 * u * ref.abs() + 4 * u * ref.pow(2).mean().sqrt())).max().item()
    if normwise > 2 * u or worst > 1:
        return f"normwise {normwise:.3g} (bound {2 * u:.3g}), worst element {worst:.3g} x its bound"
    return None


def _fixup_passes(M: int, native: bool) -> tuple[bool, ...]:
    """Whether a correctness case runs without and with `splitk.FIXUP`: both where a split kernel may take the call
    (the GEMVs and decode kernels, M <= 16; int4_decode, to MAX_M)."""
    from qwen2q.kernels import int4_decode, tiling

    return (False, True) if M <= tiling.DECODE_MAX_M or (native and M <= int4_decode.MAX_M) else (False,)


@contextlib.contextmanager
def _fixup(on: bool):
    """Inside: split-K GEMVs and decode kernels finish in the kernel (`splitk.FIXUP`) when `on`."""
    from qwen2q.kernels import splitk

    saved, splitk.FIXUP = splitk.FIXUP, on
    try:
        yield
    finally:
        splitk.FIXUP = saved


@contextlib.contextmanager
def _plain_layer_ops():
    """Inside: the fused layer modules (`qwen2q.fused`) run their PyTorch parents, as before they existed."""
    from qwen2q import fused

    saved, fused._kernels_take = fused._kernels_take, lambda t, *params: False
    try:
        yield
    finally:
        fused._kernels_take = saved


def _kernels_per_step(model) -> int | str | None:
    """GPU kernels one eager static-path decode step launches (what its CUDA graph replays), by the profiler; None
    off CUDA, the error's text if the profiler fails (a count is not worth losing the part for)."""
    import torch

    from qwen2q.decode import StaticDecoder

    if model.model.embed_tokens.weight.device.type != "cuda":
        return None
    try:
        dec = StaticDecoder(model, 8, use_graph=False)
        token = torch.zeros(1, 1, dtype=torch.long)
        dec.prefill(torch.zeros(1, 2, dtype=torch.long))
        dec.step(token)  # lazy initialisation and compiles outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            dec.step(token)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset")))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:200]


def _has_native(fmt: str, N: int, K: int) -> bool:
    """An int4 weight of this shape has the GEMV layout (`triton_ops.gemv_applies`), so it also runs alone on it."""
    from qwen2q.kernels import int4_native

    return fmt.startswith("int4") and int4_native.supports(K, int(fmt.rpartition("g")[2])) and N % 64 == 0


def correctness_cases(dry_run: bool) -> list[tuple]:
    """(fmt, name, N, K, M, dtype, bias, strided), most important first: every format's M = 1 path on the 7B shapes,
    then the split-K, GEMM and dequantize-once paths, 72B, group 32 and odd shapes."""
    if dry_run:
        shapes = {"small": (128, 256), "odd": (72, 192)}
        ms = (1, 3, 17, 260)
    else:
        shapes = {**SHAPES_7B, "72b gate_proj/up_proj": (29568, 8192), "odd": (200, 320)}
        ms = (1, 16, 2048, 2, 17, 300, 7, 64, 65, 150)  # the paths that matter most first: the budget may cut the rest
    cases = []
    for M in ms:
        for shape_name, (N, K) in shapes.items():
            if M >= 300 and shape_name not in ("q_proj/o_proj", "gate_proj/up_proj", "small"):
                continue
            for i, fmt in enumerate(("int4-g128", "nf4", "int8", "int4-g32")):
                if fmt == "int4-g32" and shape_name not in ("q_proj/o_proj", "small"):
                    continue
                if fmt.startswith("int4") and K % int(fmt.rpartition("g")[2]):
                    continue
                dtype = ("bfloat16", "float16")[(M + i) % 2]
                cases.append((fmt, shape_name, N, K, M, dtype, (M + i) % 3 != 0, M == 7 or (dry_run and M == 3)))
    return cases


def part_correct(c: Check, deadline: float) -> dict:
    import torch

    from qwen2q.kernels import int4_native, ops, triton_ops  # noqa: F401  (ops: the custom ops)

    cases, failures, done = correctness_cases(c.dry_run), [], 0
    weights: dict = {}
    for fmt, shape_name, N, K, M, dtype_name, has_bias, strided in cases:
        if time.monotonic() > deadline:
            break
        key = (fmt, N, K)
        if key not in weights:  # every weight kept: ~6 GB with its fp32 reference, far under an H200's memory
            weights[key] = _weight(fmt, N, K, c.device, seed=len(weights))
        q, W = weights[key]
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(done)
        if strided:  # x [M, K] with stride (1, M): a transposed view
            x = torch.randn(K, M, generator=g).to(dtype).to(c.device).t()
        else:
            x = torch.randn(M, K, generator=g).to(dtype).to(c.device)
        bias = torch.randn(N, generator=g).to(dtype).to(c.device) if has_bias else None
        natives = [None]
        if fmt.startswith("int4") and triton_ops.gemv_applies(q):  # as a module on CUDA holds it: native alone
            natives.append(int4_native.from_awq(q))
        for native, fixup in [(n, f) for n in natives for f in _fixup_passes(M, n is not None)]:
            out = torch.full((M, N), float("nan"), dtype=dtype, device=c.device)
            flags = [f for f, on in (("bias", has_bias), ("strided-x", strided), ("native", native is not None),
                                     ("fixup", fixup)) if on]
            label = " ".join([fmt, shape_name, f"M={M}", dtype_name, *flags])
            try:
                with _fixup(fixup):
                    _call(fmt, x, q if native is None else None, bias, out, native)
                problem = _close(out, x, W, bias, dtype_name)
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            done += 1
            if problem:
                failures.append(f"{label}: {problem}")
                c.log(f"correct FAIL {label}: {problem}")
    # split-K determinism and the custom op, on the 7B q shape (small in a dry run)
    extra = {}
    N, K = (128, 256) if c.dry_run else SHAPES_7B["q_proj/o_proj"]
    q, W = _weight("int8", N, K, c.device, seed=99)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(c.device)
    extra["split_k_deterministic"] = bool(torch.equal(_call("int8", x, q, None, None), _call("int8", x, q, None, None)))
    y = torch.ops.qwen2q.int8_linear(x, q.qweight, q.absmax, None)
    extra["custom_op"] = _close(y, x, W, None, "bfloat16") or "ok"
    # the in-kernel split-K fix-up (opt-in, splitk.FIXUP): the reduce launch's bits, every time (no races)
    q4 = int4_native.from_awq(_weight("int4-g128", N, K, c.device, seed=98)[0])
    x1 = x[:1].contiguous()
    x16 = torch.randn(16, K, generator=torch.Generator().manual_seed(16)).to(torch.bfloat16).to(c.device)
    reduced = [triton_ops.int4_linear(xm, None, native=q4) for xm in (x1, x16)]  # the GEMV, int4_decode
    with _fixup(True):
        extra["fixup_equals_reduce"] = all(torch.equal(triton_ops.int4_linear(xm, None, native=q4), y)
                                           for _ in range(3 if c.dry_run else 100) for xm, y in zip((x1, x16), reduced))
    return {"cases": done, "planned": sum(len(_fixup_passes(m, native)) for f, _, n, k, m, *_ in cases
                                          for native in (False, True)[:1 + _has_native(f, n, k)]),
            "failures": failures, **extra}


# -------------------------------------------------------------------------------------------------------- graph

def _tiny_quantized(method: str, device, dtype):
    """The embedded model quantized in memory with `method` on `device` (round to nearest), as a loaded model."""
    import torch

    from qwen2q.fused import use_fused_ops
    from qwen2q.loader import load_model

    model = load_model(REPO / "qwen2q" / "assets" / "qwen2-tiny", device=device, dtype=dtype)
    if method != "bf16":
        quantize_in_memory(model, method, dtype)
        if torch.device(device).type == "cuda":
            use_fused_ops(model)  # group the quantized projections, as loading a quantized checkpoint does
    return model


def quantize_in_memory(model, method: str, dtype, head: bool = False) -> None:
    """Replace the decoder layers' linears of `model` (with `head`, lm_head alone) by `method`'s quantized modules
    (round to nearest), on the model's device, as loading a checkpoint of that method would (prepared for the
    kernels)."""
    import torch

    from qwen2q.qlinear import prepare_kernels, quantize_linear, swap_linears
    from qwen2q.recipe import Recipe, Rule

    fmt = {"int4": ("awq-gemm", {"group_size": 128}), "nf4": ("bnb-nf4", {}), "int8": ("bnb-int8", {})}[method]
    recipe = Recipe((Rule("lm_head", fmt[0], fmt[1]),), skip=()) if head else Recipe((Rule("*", fmt[0], fmt[1]),))
    dense = {name: (m.weight.data, m.bias.data if m.bias is not None else None)
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (name == "lm_head") == head}
    swapped = swap_linears(model, recipe, dtype)
    for module in swapped:
        weight, bias = dense.pop(module.name)
        for key, tensor in quantize_linear(recipe, module.name, weight).items():
            module.load_checkpoint_tensor(key[len(module.name) + 1:], tensor)
        if bias is not None:
            module.load_checkpoint_tensor("bias", bias)
        module.finish_loading()
        del weight, bias
    prepare_kernels(swapped)


def part_graph(c: Check, deadline: float) -> dict:
    import torch

    from qwen2q.decode import StaticDecoder

    results = {}
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0)).to(c.device)
    for method in ("bf16", "int4", "nf4", "int8"):
        if time.monotonic() > deadline:
            break
        model = _tiny_quantized(method, c.device, torch.bfloat16)
        eager = StaticDecoder(model, 32, use_graph=False)
        graphed = StaticDecoder(model, 32, use_graph=not c.dry_run)
        a, b = eager.prefill(ids[:, :8]), graphed.prefill(ids[:, :8])
        equal = bool(torch.equal(a, b))
        for t in range(8, 24):
            a, b = eager.step(ids[:, t:t + 1]), graphed.step(ids[:, t:t + 1])
            equal = equal and bool(torch.equal(a, b))
        results[method] = {"graph_equals_eager": equal, "graph_used": graphed.use_graph}
        # the fused layer steps (load_model puts them in on CUDA) against the PyTorch code they replace
        fused_logits = StaticDecoder(model, 32, use_graph=False).prefill(ids[:, :8]).float()
        with _plain_layer_ops():
            plain_logits = StaticDecoder(model, 32, use_graph=False).prefill(ids[:, :8]).float()
        results[method]["fused_vs_plain_max_abs"] = round((fused_logits - plain_logits).abs().max().item(), 5)
        results[method]["logit_scale"] = round(plain_logits.abs().max().item(), 3)
    return {"formats": results}


# ------------------------------------------------------------------------------------------------------ kernels

def _graph_us(calls, reps_per_graph: int, replays: int) -> float:
    """Median microseconds per call of `calls` (a list of zero-argument functions cycled in order), captured
    `reps_per_graph` calls to a CUDA graph and replayed `replays` times; warm-up outside the capture."""
    import torch

    for fn in calls[:2]:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps_per_graph):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps_per_graph)
    return statistics.median(times)


# Other (BLOCK_N, num_warps, num_stages) for int4_decode at M <= 16, timed beside the runtime's (128, 2, 3): one warp of
# 64 rows (more programs, twice the x reads), four warps of 256 rows (wgmma, a quarter of the x reads), two stages.
NATIVE_TILES = ((64, 1, 3), (256, 4, 3), (128, 2, 2))


def part_kernels(c: Check, deadline: float) -> dict:
    import torch

    from qwen2q.kernels import int4_decode, int4_native, int4_prefill, tiling, triton_ops

    if c.dry_run:  # the bookkeeping below, on one tiny shape, without timings
        shapes, ms, l2 = {"small": (128, 256)}, (1, 3, 17, int4_decode.MAX_M), 1
    else:
        shapes, ms = SHAPES_7B, (1, 16, 2048, int4_decode.MAX_M)  # MAX_M: where int4_decode hands over
        l2 = torch.cuda.get_device_properties(0).L2_cache_size or 60 * 2**20
    copy_gbs = (c.results["parts"].get("env") or {}).get("copy_gbs")
    rows: list[dict] = []
    setups: dict[tuple[str, str], tuple] = {}

    def setup(proj: str, fmt: str, N: int, K: int) -> tuple:
        """(weights, natives, nbytes) of a projection in a format: copies enough to cycle past L2, made once."""
        if (proj, fmt) in setups:
            return setups[proj, fmt]
        natives = None
        if fmt == "bf16":
            g = torch.Generator().manual_seed(1)
            dense = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16).to(c.device)
            n_copies = max(2, math.ceil(3 * l2 / dense.nbytes))
            weights = [dense] + [dense.clone() for _ in range(n_copies - 1)]
            nbytes = dense.nbytes
        else:
            q, _ = _weight(fmt, N, K, c.device, seed=2)
            nbytes = sum(t.nbytes for t in vars(q).values() if isinstance(t, torch.Tensor))
            n_copies = max(2, math.ceil(3 * l2 / nbytes))
            weights = [q] + [dataclasses.replace(q, **{k: v.clone() for k, v in vars(q).items()
                                                      if isinstance(v, torch.Tensor)}) for _ in range(n_copies - 1)]
            natives = [int4_native.from_awq(w) if fmt.startswith("int4") and triton_ops.gemv_applies(w) else None
                       for w in weights]
        setups[proj, fmt] = (weights, natives or [None] * len(weights), nbytes)
        return setups[proj, fmt]

    cases = [(M, proj, N, K, fmt) for M in ms for proj, (N, K) in shapes.items()
             for fmt in ("int4-g128", "nf4", "int8", "bf16") if M != int4_decode.MAX_M or fmt in ("int4-g128", "bf16")]
    # what an int4 model on CUDA launches for q, k, v and for gate, up (`fused.FusedProjections`), at decode sizes
    grouped = {"small": {"grouped small": (256, 256)}}.get(next(iter(shapes)), GROUPED_7B)
    cases += [(M, proj, N, K, fmt) for M in ms[:2] for proj, (N, K) in grouped.items() for fmt in ("int4-g128", "bf16")]
    cases.sort(key=lambda case: ms.index(case[0]))  # stable: M outer still
    note = None
    for M, proj, N, K, fmt in cases:  # M outer: if the share runs out, every projection has its M = 1 rows first
        if time.monotonic() > deadline:
            note = "stopped at the part's time share"
            break
        weights, natives, nbytes = setup(proj, fmt, N, K)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16).to(c.device)
        out = torch.empty(M, N, dtype=torch.bfloat16, device=c.device)
        variants = [("runtime", None, None)]  # (name, dequantize_first forced, int4_decode tile)
        if fmt in ("int4-g128", "nf4") and M > tiling.DECODE_MAX_M:
            variants.append(("fused", False, None))  # int4: on AWQ's layout
        if fmt == "int4-g128" and M > 1:
            # the AWQ-layout path the native one replaced (split-K decode, fused GEMM or AWQ dequantize +
            # cuBLAS, as M and `tiling.dequantize_first` choose)
            variants.append(("awq-layout", None, None))
            if M <= 16 and proj in ("q_proj/o_proj", "gate_proj/up_proj", "small"):  # two shapes: time
                variants += [(f"native {n}x{w}w s{s}", None, (n, w, s)) for n, w, s in NATIVE_TILES]
        if fmt == "int4-g128" and M == int4_decode.MAX_M:  # the path past MAX_M, at MAX_M: where to cut
            variants.append(("native-dequantize", None, None))
        if fmt != "bf16" and M <= 16:  # split-K GEMVs and decode kernels finishing in the kernel: one launch
            variants.append(("fixup", None, None))
        if fmt != "bf16" and M == 1:  # the GEMV unsplit: fewer programs, but no reduce launch and no partials
            variants.append(("no-split", None, None))
        for variant, force, tile in variants:
            if fmt == "bf16":
                calls = [lambda w=w: torch.matmul(x, w.t(), out=out) for w in weights]
            elif variant == "no-split":
                calls = [_unsplit_gemv(fmt, x, w, n, out) for w, n in zip(weights, natives)]
            elif variant == "native-dequantize":
                calls = [lambda n=n: int4_prefill.int4_native_linear(x, n, None, out) for n in natives]
            elif tile is not None:  # int4_decode with another tile (tuning)
                config = tiling.native_decode_config(M, N, K, tiling.interpreting(), tile=tile)
                calls = [lambda n=n: int4_decode.int4_native_decode(x, n, None, out, config) for n in natives]
            else:
                layouts = natives if variant not in ("awq-layout", "fused") else [None] * len(weights)
                calls = [lambda w=w, n=n: _call(fmt, x, w, None, out, n) for w, n in zip(weights, layouts)]
            saved = tiling.dequantize_first
            if force is not None:
                tiling.dequantize_first = lambda *a: force
            try:
                with _fixup(variant == "fixup"):
                    us = None if c.dry_run else _graph_us(calls, 4 * len(calls), 20)
                    if c.dry_run:
                        for fn in calls:
                            fn()
            finally:
                tiling.dequantize_first = saved
            moved = nbytes + 2 * M * K + 2 * M * N
            row = {"proj": proj, "M": M, "format": fmt, "variant": variant, "us": us,
                   "weight_copies": len(calls)}
            if us:
                row["gbs"] = round(moved / (us * 1e-6) / 1e9, 1)
                row["fraction_of_copy"] = round(row["gbs"] / copy_gbs, 3) if copy_gbs else None
            if fmt != "bf16" and M > tiling.DECODE_MAX_M and variant == "runtime":
                module = _format_module(fmt)
                row["path"] = "dequantize+cublas" if tiling.dequantize_first(
                    M, N, K, module.GEMM_SASS_PER_WEIGHT, module.PACKED_BYTES_PER_WEIGHT) else "fused"
                if natives[0] is not None:
                    row["path"] = "native" if int4_decode.applies(M) else "native dequantize+cublas"
            rows.append(row)
        c.log(f"kernels M={M} {proj} {fmt}: " + ", ".join(
            f"{r['variant']} {r['us'] and round(r['us'], 1)} us" for r in rows
            if r["proj"] == proj and r["format"] == fmt and r["M"] == M))
    bf16 = {(r["proj"], r["M"]): r["us"] for r in rows if r["format"] == "bf16"}
    for r in rows:
        if r["format"] != "bf16" and r["us"] and bf16.get((r["proj"], r["M"])):
            r["bf16_us"] = bf16[(r["proj"], r["M"])]
            r["speedup"] = round(r["bf16_us"] / r["us"], 3)
    attention = _attention_timings(c) if time.monotonic() < deadline else []
    return {"rows": rows, "attention": attention, **({"note": note} if note else {})}


def _attention_timings(c: Check) -> list[dict]:
    """The static decode step's attention at Qwen2-7B's heads (28 query, 4 key / value, D = 128), one token at the
    cache's last position: `decode_attention` with its default split and others, against the SDPA call it replaces
    (grouped, under the additive mask: PyTorch's math backend).  Microseconds per call inside a CUDA graph."""
    import torch

    from qwen2q.kernels import decode_attention as da
    from qwen2q.model import CacheAttention, static_attention_mask

    rows = []
    for S in ((40, 600) if c.dry_run else (257, 4096)):
        g = torch.Generator().manual_seed(S)
        q = torch.randn(1, 28, 1, 128, generator=g).to(torch.bfloat16).to(c.device)
        k, v = (torch.randn(1, 4, S, 128, generator=g).to(torch.bfloat16).to(c.device) for _ in range(2))
        pos = torch.tensor([S - 1], device=c.device)
        allowed = static_attention_mask(pos, S, None)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=c.device).masked_fill(~allowed, float("-inf"))
        variants = [("sdpa", lambda: CacheAttention()(q, k, v, mask, pos, None)),
                    ("kernel", lambda: da.decode_attention(q, k, v, pos))]
        variants += [(f"kernel {n} splits", lambda n=n: da.decode_attention(q, k, v, pos, n_splits=n))
                     for n in (1, 4, 16) if n != da.splits_for(S)]
        ref = variants[0][1]().float()
        for name, fn in variants:
            err = (fn().float() - ref).abs().max().item()
            us = None if c.dry_run else _graph_us([fn], 20, 20)
            rows.append({"S": S, "variant": name, "us": us, "max_abs_vs_sdpa": round(err, 5)})
        c.log("attention S=%d: %s" % (S, ", ".join(f"{r['variant']} {r['us'] and round(r['us'], 1)} us"
                                                   for r in rows if r["S"] == S)))
    return rows


def _unsplit_gemv(fmt: str, x, w, native, out):
    """A call of `fmt`'s M = 1 GEMV with the runtime's tile but SPLIT_K = 1 (it then writes y itself)."""
    from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm

    launch, run, weight = {"int4-g128": (int4_gemm.int4_gemv_launch, int4_gemm.int4_gemv, native),
                           "nf4": (nf4_gemm.nf4_gemv_launch, nf4_gemm.nf4_gemv, w),
                           "int8": (int8_gemm.int8_gemv_launch, int8_gemm.int8_gemv, w)}[fmt]
    config = dataclasses.replace(launch(x, weight, None, out).config, SPLIT_K=1)
    return lambda: run(x, weight, None, out, config)


def _format_module(fmt: str):
    from qwen2q.kernels import int4_gemm, int8_gemm, nf4_gemm

    return {"int4-g128": int4_gemm, "nf4": nf4_gemm, "int8": int8_gemm}[fmt]


# ---------------------------------------------------------------------------------------------------------- e2e

def part_e2e(c: Check, deadline: float) -> dict:
    import torch

    from qwen2q import bench
    from qwen2q.config import Qwen2Config
    from qwen2q.fused import use_fused_ops
    from qwen2q.model import Qwen2ForCausalLM

    if c.dry_run:
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=320)
        prompt_len, new_tokens = 8, 4
    else:
        shape, prompt_len, new_tokens = QWEN2_7B, 128, 128
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    results = {}
    for method in ("bf16", "int4", "nf4", "int8"):  # transformers runs after int4: the targets first
        if time.monotonic() > deadline:
            results["note"] = "stopped at the part's time share"
            break
        torch.manual_seed(0)
        if c.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with _building(c.device):
            model = Qwen2ForCausalLM(config).eval()
        t0 = time.monotonic()
        if method != "bf16":
            quantize_in_memory(model, method, torch.bfloat16)
        if c.device.type == "cuda":
            use_fused_ops(model)  # as load_model does on CUDA
        c.sync()
        quantize_s = time.monotonic() - t0
        r = bench.run(model, prompt_len, new_tokens)
        results[method] = {"decode_tok_s": round(r["decode_tokens_per_s"], 1),
                           "prefill_tok_s": round(r["prefill_tokens_per_s"], 1),
                           "peak_gib": round(r["peak_memory_bytes"] / 2**30, 2), "cuda_graph": r["cuda_graph"],
                           "quantize_s": round(quantize_s, 1)}
        if method in ("bf16", "int4") and time.monotonic() < deadline:  # what the fused layer steps bring
            results[method]["kernels_per_step"] = _kernels_per_step(model)
            with _plain_layer_ops():
                results[method]["kernels_per_step_unfused"] = _kernels_per_step(model)
                r = bench.run(model, prompt_len, new_tokens)
            results[method]["decode_tok_s_unfused"] = round(r["decode_tokens_per_s"], 1)
        c.log(f"e2e {method}: {results[method]}")
        if method == "int4" and time.monotonic() < deadline:  # the same model, split-K GEMVs finished in the kernel
            from qwen2q.kernels import splitk

            splitk.counters(c.device, 1024)  # made before bench captures its graph (none is made during one)
            with _fixup(True):
                r = bench.run(model, prompt_len, new_tokens)
            results[method]["decode_tok_s_fixup"] = round(r["decode_tokens_per_s"], 1)
            c.log(f"e2e int4 with the fix-up: {results[method]['decode_tok_s_fixup']} tokens/s decode")
        if method == "int4" and time.monotonic() < deadline:  # the bf16 lm_head caps int4 / bf16 at ~3.2x
            quantize_in_memory(model, method, torch.bfloat16, head=True)
            r = bench.run(model, prompt_len, new_tokens)
            with _fixup(True):
                r_fixup = bench.run(model, prompt_len, new_tokens)
            results[method]["head_int4"] = {"decode_tok_s": round(r["decode_tokens_per_s"], 1),
                                            "decode_tok_s_fixup": round(r_fixup["decode_tokens_per_s"], 1),
                                            "peak_gib": round(r_fixup["peak_memory_bytes"] / 2**30, 2)}
            c.log(f"e2e int4 with lm_head int4 too: {results[method]['head_int4']}")
        if method == "bf16":
            bf16_state = {k: v for k, v in model.state_dict().items()}  # for transformers, after int4
        del model
        if method == "int4" and time.monotonic() < deadline:
            results["transformers_decode_tok_s"] = _transformers_decode(bf16_state, config, c, prompt_len, new_tokens)
            c.log(f"e2e transformers: {results['transformers_decode_tok_s']} tokens/s")
        if method == "int4":
            del bf16_state
    return results


@contextlib.contextmanager
def _building(device):
    """Modules made inside are made on `device` in bf16 (a 7B model is never built in fp32 first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _transformers_decode(state: dict, config, c: Check, prompt_len: int, new_tokens: int):
    """transformers' greedy `generate` on our bf16 weights: decode tokens/s from the time of new_tokens tokens
    minus the time of one (the prefill)."""
    import torch

    try:
        from transformers import Qwen2Config as HFConfig
        from transformers import Qwen2ForCausalLM as HFModel
    except ImportError:
        return None
    hf_config = HFConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                         num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                         num_key_value_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
                         max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
                         torch_dtype=torch.bfloat16)
    with _building(c.device):
        hf = HFModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"transformers' Qwen2 does not take our weights: missing {missing}, unexpected {unexpected}")
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(c.device)

    def generate(n):
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        c.sync()

    generate(2)
    t0 = time.monotonic()
    generate(1)
    one = time.monotonic() - t0
    t0 = time.monotonic()
    generate(new_tokens)
    many = time.monotonic() - t0
    return round((new_tokens - 1) / max(many - one, 1e-9), 1)


# ---------------------------------------------------------------------------------------------------------- cli

def part_cli(c: Check, deadline: float) -> dict:
    import tempfile

    device = "cpu" if c.dry_run else "cuda"
    calib = REPO / ".gpu_carry" / "calib.txt"
    if not calib.exists():
        shared = REPO.parent / "shared" / "data" / "calib" / "wiki.utf8"
        calib = shared if shared.exists() else None
    qwen2q = [sys.executable, "-m", "qwen2q.cli"]
    results: dict = {"calibration_text": str(calib) if calib else None}
    failures = []

    def qwen2q_command(name: str, *args: str) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run([*qwen2q, *args], capture_output=True, text=True,
                                  timeout=max(10, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(args, "timeout", "", "timed out at the part's time share")
        results[name] = {"returncode": done.returncode, "stdout": done.stdout[-800:], "stderr": done.stderr[-600:]}
        if done.returncode:
            failures.append(f"{name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return done

    samples, seq_len = ("4", "64") if c.dry_run else ("8", "128")
    calibration = ["--calib-data", str(calib), "--calib-samples", samples, "--calib-seq-len", seq_len]
    with tempfile.TemporaryDirectory() as tmp:
        # Round-to-nearest methods take no --device (it is a calibration option); the calibrated ones run on it.
        jobs = [("int4", []), ("nf4", []), ("int8", [])]
        if calib:
            jobs += [("awq", ["--device", device, *calibration]),
                     ("nf4-awq-scales", ["--device", device, "--awq-scales", *calibration])]
        for name, extra in jobs:
            if time.monotonic() > deadline:
                break
            method = name.partition("-")[0]
            qwen2q_command(f"quantize_{name}", "quantize", "qwen2q:tiny", str(Path(tmp) / name), "-m", method, *extra)
        if (Path(tmp) / "int4").exists() and time.monotonic() < deadline:
            qwen2q_command("bench_int4", "bench", str(Path(tmp) / "int4"), "--device", device, "--prompt-len", "16",
                           "--new-tokens", "16")
        if (Path(tmp) / "awq").exists() and device == "cuda" and time.monotonic() < deadline:
            cpu_dst = Path(tmp) / "awq-cpu"
            if qwen2q_command("quantize_awq_cpu", "quantize", "qwen2q:tiny", str(cpu_dst), "-m", "awq", "--device",
                              "cpu", *calibration).returncode == 0:
                results["awq_cuda_vs_cpu_kl"] = _kl(Path(tmp) / "awq", cpu_dst)
    results["failures"] = failures
    return results


def _kl(path_a: Path, path_b: Path) -> float:
    """Mean KL(b || a) of next-token distributions over 256 tokens of the embedded model's vocabulary, fp32 on CPU."""
    import torch

    import qwen2q

    ids = torch.randint(0, 320, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = qwen2q.load(path_a, device="cpu", dtype="float32").model(ids).log_softmax(-1)
        b = qwen2q.load(path_b, device="cpu", dtype="float32").model(ids).log_softmax(-1)
    return float((b.exp() * (b - a)).sum(-1).mean())


# ------------------------------------------------------------------------------------------------------ command

FUNCTIONS = {"env": part_env, "tests": part_tests, "correct": part_correct, "graph": part_graph,
             "kernels": part_kernels, "e2e": part_e2e, "cli": part_cli}


@click.command("gpu-check")
@click.option("--parts", default=",".join(PARTS), show_default=True, help="Comma-separated parts to run, in order.")
@click.option("--budget", type=click.IntRange(30, 3600), default=480, show_default=True,
              help="Seconds for the whole run; each part also stops at its share.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the JSON and the log [default: $OUT if set, else evals/results].")
@click.option("--dry-run", is_flag=True, help="On CPU under the Triton interpreter, tiny shapes, no timings (CI).")
def command(parts, budget, out_dir, dry_run) -> int:
    """The one-shot GPU check of issue 20 (see the module docstring); `--dry-run` checks the script on CPU.

    \b
    Examples:
      python dev gpu-check                       # on the GPU machine, after pip install --no-deps -e .
      python dev gpu-check --parts env,kernels --budget 200
      python dev gpu-check --dry-run --out /tmp/gpu-check
    """
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise click.UsageError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ["TRITON_INTERPRET"] = "1" if dry_run else "0"  # before any kernel module is imported (lazily)
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: run with --dry-run on CPU")
    out_dir = out_dir or Path(os.environ.get("OUT") or REPO / "evals" / "results")
    c = Check(out_dir, budget, dry_run)
    c.log(f"gpu-check on {c.gpu}: parts {', '.join(chosen)}, budget {budget} s -> {c.json_path}")
    for name in chosen:
        c.run_part(name, FUNCTIONS[name])
    failed = [n for n, r in c.results["parts"].items() if r.get("status") == "error" or r.get("failures")]
    correct = c.results["parts"].get("correct", {})
    click.echo(f"gpu-check: {len(chosen)} parts in {c.elapsed():.0f} s; parts with errors or failures:"
               f" {', '.join(failed) or 'none'}; correctness failures: {len(correct.get('failures', []))} of"
               f" {correct.get('cases', 0)} cases; {c.json_path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)
