r"""How much one module's quantization moves the model: a second-order estimate of the KL increase.

Quantizing linear W [N, K] alone changes its output by dy = dW x for each token's input x.  For a small
change, the model's KL against its unquantized self grows by the quadratic form of its Fisher
information (the first-order term vanishes at the unquantized point):

    KL  ~=  1/2 E_tokens[ sum_j  F_j  dy_j^2 ],    F_j = E_{t ~ p}[ (d log p_t / d y_j)^2 ]

with p the model's own next-token distribution.  We keep the Fisher's diagonal over output channels j
(and token positions), and take the gradient energy and the output error as uncorrelated across tokens:

    predicted KL(module, choice)  =  1/2 sum_j  F_j  (dW H dW^T)_jj / T

F_j: mean over Fisher tokens of the squared gradient of the summed log-likelihood of tokens sampled
from the model itself, at output channel j (`output_fisher`, one backward pass, layer by layer).
H = X^T X over the T calibration tokens that reach the module in the unquantized model (as GPTQ
uses it), dW = Q(W) - W with Q the choice's own rounding: GPTQ onto the format's grid where it has one,
else its round-to-nearest (`choice_errors`, one forward pass, layer by layer).  AWQ's scale search is
left out of the estimate (it would cost one search per choice); it only lowers the real error.

lm_head needs no estimate: its error changes the logits alone, so the KL of the model with lm_head alone
quantized is measured directly on held-out windows' final hidden states (`quantized_heads`, `choice_errors`).

The model's KL for several quantized modules is predicted as the sum of theirs (additivity: the
cross terms of different modules' errors average out to first order).  `qwen2q.mixed` checks the sum
against a measured KL of the result and corrects it.

Memory: like AWQ's calibration, one decoder layer's weights and the calibration activations
(N x L x hidden, fp32) on the device at a time; the Fisher pass also keeps every layer's input for its
Fisher tokens (layers x tokens x hidden fp32) in host memory, 352 MB for Qwen2-0.5B with 4096 tokens;
the uniform trials keep a stream of held-out windows per kind and option (13 x 8 windows x 512 tokens x
hidden fp32: 190 MB for Qwen2-0.5B, 1.7 GB for 72B's hidden size); lm_head's options are held at once
while their KLs are measured (3 x vocab x hidden: 1.6 GB fp32 for Qwen2-0.5B, 7.5 GB in bf16 for 72B).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from qwen2q.architecture import HEAD, INPUT_READER, LINEAR_INPUT, LINEARS, layer_prefix
from qwen2q.calibrate.gptq import gptq_round, inverse_factor
from qwen2q.calibrate.pipeline import _Recorder, forward_precision, load_layer, run_layer
from qwen2q.checkpoint import TensorIndex
from qwen2q.errors import Qwen2qError
from qwen2q.model import RMSNorm
from qwen2q.recipe import Choice
from qwen2q.rope import RotaryEmbedding

LOGIT_CHUNK = 128  # positions turned into fp32 log-probabilities at a time in the Fisher pass (with gradients)
# positions per chunk in the KL passes (no gradients): a larger chunk reads the [vocab, hidden] head fewer
# times; 512 cut a chunk's logits + log-softmax per position by 30% against 128 (2-core AVX2 CPU, vocab 151936)
KL_CHUNK = 512


def _rotary(config, seq_len: int, device):
    rotary = RotaryEmbedding(config.rope, config.head_dim).to(device)
    return rotary(torch.arange(seq_len, device=device)[None], torch.float32, seq_end=seq_len)


def output_head(index: TensorIndex, config, device, compute_dtype: str = "bfloat16") -> tuple[RMSNorm, torch.Tensor]:
    """The final norm (fp32 weight) and the output projection [vocab, hidden]: in the checkpoint's dtype (the
    logits computed as inference computes them), or fp32 when `compute_dtype` is "float32"."""
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps).to(device)
    norm.weight.data = index.get("model.norm.weight").to(device, torch.float32)
    name = "lm_head.weight" if "lm_head.weight" in index and not config.tie_word_embeddings else "model.embed_tokens.weight"
    return norm, index.get(name).to(device, torch.float32 if compute_dtype == "float32" else None)


@torch.no_grad()
def final_gram(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """X^T X fp32 [hidden, hidden] of the final norm's output over final hidden states x fp32 [n, L, hidden]
    (what lm_head reads), one sample at a time."""
    gram = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
    for b in range(x.shape[0]):
        h = norm(x[b])
        gram += h.t() @ h
    return gram


def log_probs(norm: RMSNorm, head: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities [T, vocab] of final hidden states h [T, hidden] (fp32)."""
    logits = norm(h) @ head.t().float() if head.dtype == torch.float32 else (norm(h).to(head.dtype) @ head.t())
    return F.log_softmax(logits.float(), dim=-1)


def output_fisher(index: TensorIndex, config, ids: torch.Tensor, device: torch.device, compute_dtype: str = "bfloat16",
                  seed: int = 0, progress: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """{decoder linear's full name: F fp32 [out_features]}: mean over the tokens of ids int64 [n, L] of the
    squared gradient, at that linear's output, of sum_t log p(s_t), s_t drawn from the model's own p at
    position t (fixed seed).  progress() is called once per layer of each pass (2 x layers calls)."""
    n, seq_len = ids.shape
    cos, sin = _rotary(config, seq_len, device)
    precision = forward_precision(device, compute_dtype)
    x = index.get("model.embed_tokens.weight")[ids].to(device, torch.float32)
    inputs = []
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            layer = load_layer(index, config, i, device)
            index.release()
            inputs.append(x.cpu())
            with forward_precision(device, compute_dtype):
                x = run_layer(layer, x, cos, sin).float()
            if progress:
                progress()
    norm, head = output_head(index, config, device, compute_dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    grad = torch.empty_like(x)
    for b in range(n):
        for s in range(0, seq_len, LOGIT_CHUNK):
            h = x[b, s : s + LOGIT_CHUNK].detach().requires_grad_()
            with torch.enable_grad():
                lp = log_probs(norm, head, h)
                drawn = torch.multinomial(lp.detach().exp(), 1, generator=generator)
                lp.gather(-1, drawn).sum().backward()
            grad[b, s : s + LOGIT_CHUNK] = h.grad
    del head, x
    fisher: dict[str, torch.Tensor] = {}
    for i in reversed(range(config.num_hidden_layers)):
        layer = load_layer(index, config, i, device)
        index.release()
        layer.requires_grad_(False)
        sums = {name: torch.zeros(layer.get_submodule(name).out_features, device=device) for name in LINEARS}

        def keep(name):
            def add(g):  # returns None: the gradient flows on unchanged
                sums[name].add_(g.float().pow(2).reshape(-1, g.shape[-1]).sum(0))

            def hook(module, args, out):
                out.register_hook(add)
            return hook

        hooks = [layer.get_submodule(name).register_forward_hook(keep(name)) for name in LINEARS]
        try:
            for b in range(n):
                xb = inputs[i][b : b + 1].to(device).requires_grad_()
                with torch.enable_grad(), precision:
                    y = layer(xb, cos, sin)
                y.float().backward(grad[b : b + 1])
                grad[b : b + 1] = xb.grad
        finally:
            for h in hooks:
                h.remove()
        inputs[i] = None
        for name in LINEARS:
            fisher[layer_prefix(i) + name] = (sums[name] / (n * seq_len)).cpu()
        if not all(torch.isfinite(f).all() for f in sums.values()):
            raise Qwen2qError(f"layer {i}: the Fisher pass gave NaN/Inf gradients")
        if progress:
            progress()
    return fisher


def quantization_error(weight: torch.Tensor, gram: torch.Tensor, choice: Choice | None, factor=None) -> torch.Tensor:
    """dW = Q(W) - W fp32 [N, K] for weight fp32 [N, K] with its input's gram X^T X fp32 [K, K]: GPTQ onto
    the choice's grid where its format has one (factor: `inverse_factor(gram)`, if already computed),
    else its round-to-nearest; zero for None (kept)."""
    if choice is None:
        return torch.zeros_like(weight)
    grid = choice.format.grid(choice.params, weight.shape[1])
    if grid is not None and choice.algorithm.rounding == "gptq":
        q, _ = gptq_round(weight, gram, grid, factor=factor)
    else:
        q = choice.format.fake_quantize(weight, choice.params)
    return q - weight


def predicted_kl(delta: torch.Tensor, gram: torch.Tensor, tokens: int, fisher: torch.Tensor) -> float:
    """1/2 sum_j F_j (dW H dW^T)_jj / T for dW fp32 [N, K], H fp32 [K, K], F fp32 [N]."""
    per_row = ((delta @ gram) * delta).sum(1) / tokens
    return 0.5 * float((fisher.to(per_row.device) * per_row).sum())


def choice_errors(index: TensorIndex, config, ids: torch.Tensor, device: torch.device,
                  options: Mapping[str, Mapping[str, Choice | None]], fisher: Mapping[str, torch.Tensor],
                  compute_dtype: str = "bfloat16", progress: Callable[[], None] | None = None,
                  held: torch.Tensor | None = None, kinds: Mapping[str, Sequence[str]] | None = None,
                  head_options: Mapping[str, Choice | None] | None = None,
                  ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """({decoder linear's full name: {option name: predicted KL}}, {kind: {option name: measured KL}}).

    The first: every option `options` gives each linear ({name: {option name: its Choice, or None to keep
    it}}), the unquantized model's activations over ids int64 [N, L] feeding each layer.  The second,
    with `held` windows int64 [h, L]: for each kind of module (`kinds`: {kind: its linears' names within a
    layer, e.g. ("mlp.down_proj",)}; default one kind "all" of every linear) and option, the KL against the
    source, measured on those windows, of the model with that kind's linears in every layer quantized as
    that option by the same rounding (a uniform trial per kind and option, which calibrates the scale of
    that kind's predictions: `qwen2q.mixed`); empty without `held`.  With `head_options` ({option name:
    Choice or None}) and `held`, lm_head ("lm_head" in both) is measured, not estimated: the KL of the
    model with lm_head alone rounded so (GPTQ through the gram of the final norm's output over ids), on
    the held windows, is both its prediction and its trial (0 for None).  Each trial is a stream of the held
    windows through the layers beside the source's: (kinds x options + 1) x h x L x hidden fp32 in memory.
    progress() is called once per layer."""
    n, seq_len = ids.shape
    cos, sin = _rotary(config, seq_len, device)
    embed = index.get("model.embed_tokens.weight")
    x = embed[ids].to(device, torch.float32)
    kinds = dict(kinds) if kinds is not None else {"all": tuple(LINEARS)}
    trial_options = [o for o, c in next(iter(options.values())).items() if c is not None] if held is not None else []
    trials = [(k, o) for k in kinds for o in trial_options]
    streams = {key: embed[held].to(device, torch.float32) for key in [None, *trials]} if held is not None else {}
    out: dict[str, dict[str, float]] = {}
    for i in range(config.num_hidden_layers):
        layer = load_layer(index, config, i, device)
        index.release()
        recorders = {kind: _Recorder(gram=True) for kind in INPUT_READER}
        hooks = [layer.get_submodule(INPUT_READER[k]).register_forward_pre_hook(r) for k, r in recorders.items()]
        try:
            with forward_precision(device, compute_dtype):
                x = run_layer(layer, x, cos, sin).float()  # the next layer's input, unquantized
        finally:
            for h in hooks:
                h.remove()
        if not torch.isfinite(x).all():
            raise Qwen2qError(f"layer {i}: the unquantized layer's output has NaN/Inf")
        weights = {name: layer.get_submodule(name).weight.data.float() for name in LINEARS}
        factors = {kind: inverse_factor(recorders[kind].gram) for kind in dict.fromkeys(LINEAR_INPUT.values())}
        for name in LINEARS:
            out[layer_prefix(i) + name] = {}
        option_names = list(dict.fromkeys(o for name in LINEARS for o in options[layer_prefix(i) + name]))
        for option in option_names:  # one option at a time: one layer's worth of trial weights held
            trial = {}
            for name in LINEARS:
                full, kind = layer_prefix(i) + name, LINEAR_INPUT[name]
                if option not in options[full]:
                    continue
                r = recorders[kind]
                try:
                    delta = quantization_error(weights[name], r.gram, options[full][option], factors[kind])
                except ValueError as e:
                    raise Qwen2qError(f"{full} as {option}: {e}") from None
                out[full][option] = predicted_kl(delta, r.gram, r.count, fisher[full])
                trial[name] = weights[name] + delta
            for kind, members in kinds.items():
                if (kind, option) in streams:
                    _run_trial(layer, streams, (kind, option), {m: trial[m] for m in members if m in trial},
                               cos, sin, device, compute_dtype)
        del factors
        if streams:
            _run_trial(layer, streams, None, {}, cos, sin, device, compute_dtype)
        if progress:
            progress()
    measured: dict[str, dict[str, float]] = {}
    if held is not None:
        if HEAD in kinds:
            raise ValueError(f"a kind of decoder linear cannot be named {HEAD!r}")
        norm, head = output_head(index, config, device, compute_dtype)
        others = {key: (streams[key], None) for key in trials}
        if head_options:  # lm_head alone quantized: the source's hidden states through each rounded head
            heads = quantized_heads(index, config, x, head_options, device, head.dtype)
            others.update({(HEAD, option): (streams[None], w) for option, w in heads.items()})
        # one pass over the held windows: the source's log-probabilities once for every model
        kls = many_window_kls(norm, head, streams[None], others)
        for (kind, option), window in kls.items():
            measured.setdefault(kind, {})[option] = sum(window) / len(window)
        if head_options:  # its measured KL is its prediction too (0 kept)
            row = measured.setdefault(HEAD, {})
            out[HEAD] = {option: row.get(option, 0.0) for option in head_options}
        index.release()
    return out, measured


def quantized_heads(index: TensorIndex, config, x: torch.Tensor, options: Mapping[str, Choice | None], device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{option: lm_head [vocab, hidden] in `dtype` as that option rounds it} for the options that quantize
    (None: kept, left out), each rounded through the gram of the final norm's output over x fp32 [n, L, hidden]
    (`quantization_error`; one factorisation for all).  Every head is held at once: options x vocab x hidden."""
    norm32, weight = output_head(index, config, device, "float32")
    gram = final_gram(norm32, x)
    factor = inverse_factor(gram)
    heads = {}
    for option, choice in options.items():
        if choice is None:
            continue
        try:
            delta = quantization_error(weight, gram, choice, factor)
        except ValueError as e:
            raise Qwen2qError(f"{HEAD} as {option}: {e}") from None
        heads[option] = (weight + delta).to(dtype)
    return heads


def _run_trial(layer, streams, key, trial, cos, sin, device, compute_dtype) -> None:
    """Move held-out stream `streams[key]` through `layer` with its linears holding `trial` ({linear:
    quantized weight}; the others, and every one for the source stream, keep theirs)."""
    originals = {name: layer.get_submodule(name).weight.data for name in trial}
    try:
        for name, w in trial.items():
            layer.get_submodule(name).weight.data = w
        with forward_precision(device, compute_dtype):
            streams[key] = run_layer(layer, streams[key], cos, sin).float()
    finally:
        for name, w in originals.items():
            layer.get_submodule(name).weight.data = w


@torch.no_grad()
def window_kls(norm: RMSNorm, head: torch.Tensor, source: torch.Tensor, other: torch.Tensor,
               other_head: torch.Tensor | None = None) -> list[float]:
    """Each window's mean KL(source || other) of the next-token distributions from final hidden states fp32
    [h, L, hidden], at the positions `qwen2q.evals.drift` scores (each window's first L - 1); `other`'s
    through `other_head` [vocab, hidden] (a quantized lm_head, in head's dtype) when given, else `head`."""
    return many_window_kls(norm, head, source, {None: (other, other_head)})[None]


@torch.no_grad()
def many_window_kls(norm: RMSNorm, head: torch.Tensor, source: torch.Tensor,
                    others: Mapping[object, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[object, list[float]]:
    """`window_kls` of several models against one source at once: {key: each window's mean KL(source ||
    that model)} for others {key: (final hidden states fp32 [h, L, hidden], its lm_head [vocab, hidden] or
    None for `head`)}.  The source's log-probabilities are computed once per chunk, not once per model."""
    out: dict[object, list[float]] = {key: [] for key in others}
    scored = source.shape[1] - 1
    for b in range(source.shape[0]):
        totals = dict.fromkeys(others, 0.0)
        for s in range(0, scored, KL_CHUNK):
            end = min(s + KL_CHUNK, scored)
            lp = log_probs(norm, head, source[b, s:end])
            p = lp.exp()
            for key, (hidden, other_head) in others.items():
                lq = log_probs(norm, head if other_head is None else other_head, hidden[b, s:end])
                totals[key] += float((p * (lp - lq)).sum(-1).double().sum())
        for key, total in totals.items():
            out[key].append(total / scored)
    return out


UPPER_Z = 1.645  # one-sided 95% normal quantile


def upper_bound(window_values: list[float], z: float = UPPER_Z) -> float:
    """The mean of per-window values plus z standard errors (the one-sided 95% bound of the mean over
    windows of that text, per the central limit theorem): what a budget is checked against, so a result
    that passes on a few held-out windows also holds, 95 times in 100, on the text they were drawn from.
    One window: its value."""
    n = len(window_values)
    mean = sum(window_values) / n
    if n < 2:
        return mean
    variance = sum((v - mean) ** 2 for v in window_values) / (n - 1)
    return mean + z * math.sqrt(variance / n)


def fisher_samples(n: int, seq_len: int, tokens: int) -> list[int]:
    """Indices of ceil(tokens / seq_len) samples (at most n) spread evenly over n."""
    k = max(1, min(n, math.ceil(tokens / seq_len)))
    return sorted(set(torch.linspace(0, n - 1, k).round().long().tolist()))
