"""What a checkpoint's tensors must be, given its config.json: names, shapes, dtypes and finite values.

The rules live here and nowhere else; `qwen2q.checkpoint.validate_checkpoint` applies them to file
headers before any work starts (loading, quantizing), and `fill_module` / `qwen2q.quantize` apply `check_finite`
to each tensor's values as it is read.

Shapes, for hidden size H, intermediate size I, vocabulary V, heads n, kv heads m, head dim D:

    model.embed_tokens.weight                        [V, H]
    model.layers.{i}.self_attn.q_proj.weight / .bias [n*D, H] / [n*D]
    model.layers.{i}.self_attn.k_proj.weight / .bias [m*D, H] / [m*D]      (v_proj the same)
    model.layers.{i}.self_attn.o_proj.weight         [H, n*D]
    model.layers.{i}.mlp.gate_proj.weight            [I, H]                (up_proj the same)
    model.layers.{i}.mlp.down_proj.weight            [H, I]
    model.layers.{i}.input_layernorm.weight          [H]                   (post_attention_layernorm the same)
    model.norm.weight                                [H]
    lm_head.weight                                   [V, H]                (optional with tied embeddings)

all float32, float16 or bfloat16.  A quantized linear [out, in] stores its format's tensors instead of
`.weight` (its bias stays a float [out]); see `quantized_tensors`.
"""
from __future__ import annotations


import torch

from qwen2q.architecture import HEAD, NORMS, head_is_separate, layer_prefix, linear_shapes
from qwen2q.config import Qwen2Config
from qwen2q.errors import CheckpointError
from qwen2q.recipe import Recipe
from qwen2q.quantizers.checks import all_finite
from qwen2q.quantizers.format import TensorSpec

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
NON_FINITE_HINT = "pass allow_non_finite=True (CLI: --allow-non-finite) to accept it"


Expect = TensorSpec  # a stored tensor's allowed dtypes and shapes


def _float(*shape: int) -> Expect:
    return Expect(FLOATS, (tuple(shape),))


def quantized_tensors(scheme, name: str, out_features: int, in_features: int) -> dict[str, Expect]:
    """The stored tensors of linear `name` [out, in] in the format `scheme.format_for(name)` gives it."""
    fmt, params = scheme.format_for(name)
    try:
        return fmt.stored_tensors(name, out_features, in_features, params)
    except ValueError as e:
        raise CheckpointError(f"{name}: config.json's sizes do not fit the {fmt.name} layout: {e}") from None


def expected_tensors(config: Qwen2Config, qcfg: Recipe | None = None) -> tuple[dict[str, Expect], set[str]]:
    """(every tensor name the checkpoint may hold -> Expect, the names among them it may leave out)."""
    v, h = config.vocab_size, config.hidden_size
    expect = {"model.embed_tokens.weight": _float(v, h), "model.norm.weight": _float(h), "lm_head.weight": _float(v, h)}
    if qcfg is not None and head_is_separate(config) and qcfg.format_for(HEAD) is not None:  # a quantized lm_head
        del expect["lm_head.weight"]
        expect.update(quantized_tensors(qcfg, HEAD, v, h))
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        expect.update({p + norm + ".weight": _float(h) for norm in NORMS})
        for suffix, (out_f, in_f, bias) in linear_shapes(config).items():
            name = p + suffix
            if qcfg is not None and qcfg.format_for(name) is not None:
                expect.update(quantized_tensors(qcfg, name, out_f, in_f))
            else:
                expect[name + ".weight"] = _float(out_f, in_f)
            if bias:
                expect[name + ".bias"] = _float(out_f)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return expect, optional


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensors(config: Qwen2Config, headers: dict, qcfg: Recipe | None = None) -> None:
    """Check `headers` ({name: object with .shape, .dtype, .file}) against what `config` implies: no
    unknown names, none missing, each shape and dtype as `expected_tensors` says."""
    expect, optional = expected_tensors(config, qcfg)
    unknown = [n for n in headers if n not in expect]
    if unknown:
        raise CheckpointError(f"checkpoint has {len(unknown)} tensor(s) the model does not know: {_names(unknown)}")
    missing = [n for n in expect if n not in headers and n not in optional]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {_names(missing)}")
    for name, info in headers.items():
        e = expect[name]
        if info.dtype not in e.dtypes:
            raise CheckpointError(f"{info.file}: tensor {name} is {_dtype_name(info.dtype)}; it must be "
                                  f"{' or '.join(_dtype_name(d) for d in e.dtypes)}")
        ok = len(info.shape) == 1 if e.shapes is None else tuple(info.shape) in e.shapes
        if not ok:
            wanted = "1-D" if e.shapes is None else " or ".join(str(list(s)) for s in e.shapes)
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}; config.json implies "
                                  f"{wanted}")


def check_index(weight_map: dict[str, str], headers: dict, index_name: str) -> None:
    """An index must say where each tensor is: every stored tensor listed, under the file that holds it."""
    for name, info in headers.items():
        listed = weight_map.get(name)
        if listed != info.file.name:
            where = f"lists it in {listed}" if listed else "does not list it"
            raise CheckpointError(f"{info.file}: holds tensor {name}, but {index_name} {where}")
    absent = [n for n in weight_map if n not in headers]
    if absent:
        raise CheckpointError(f"{index_name} lists {len(absent)} tensor(s) its shards do not hold: {_names(absent)}")


def check_finite(name: str, tensor: torch.Tensor, stored: torch.Tensor | None = None) -> None:
    """Refuse NaN/Inf in tensor `name`.  `stored`: the checkpoint's tensor before a cast to `tensor`'s
    dtype, to tell a stored NaN/Inf from a value that overflows the cast."""
    if all_finite(tensor):
        return
    if stored is not None and all_finite(stored):
        limit = torch.finfo(tensor.dtype).max
        raise CheckpointError(f"tensor {name} has values beyond {_dtype_name(tensor.dtype)}'s range (+-{limit:.4g}); "
                              f"load it in a wider dtype (--dtype float32), or {NON_FINITE_HINT}")
    raise CheckpointError(f"tensor {name} has NaN or Inf values; {NON_FINITE_HINT}")
