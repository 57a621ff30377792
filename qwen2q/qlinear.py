"""Quantized linear modules, and the quantize-time conversion of one linear into checkpoint tensors.

One module class serves every format (`qwen2q.quantizers.registry`): it holds the tensors of its format's
weight object as buffers (so `.to(device)` moves them) and its plain fields beside them, plus an
unquantized bias, and its forward calls the format's `qwen2q.kernels` op.  Modules are filled from
checkpoints through `load_checkpoint_tensor(suffix, tensor)` with the checkpoint's own key suffixes
(`weight.absmax`, `SCB`, `qzeros`, ...), and `finish_loading()` checks that every tensor came.
`prepare_kernels` then gives each module the form of its weight the kernels run (`qwen2q.kernels.prepare`), held
beside the buffers (on CUDA an int4 weight's GEMV layout, held *instead of* qweight and qzeros: `kernels.replaces`)
and dropped when the buffers move to another device, and the backend its calls take
(`kernels.choose_backend`: chosen once, not read from the environment on every call; `forced_backend` overrides
it for a block).  The Qwen2 model itself is
never edited: `swap_linears` replaces its nn.Linear children from outside, each with the format its
checkpoint names for that module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from qwen2q import kernels
from qwen2q.architecture import HEAD, LINEAR_NAMES
from qwen2q.errors import CheckpointError, Qwen2qError
from qwen2q.quantizers.format import Format



class QuantLinear(nn.Module):
    """A linear y = x W^T + b whose W [out_features, in_features] is stored in `FORMAT`.

    Buffers: the tensor fields of the format's weight object, under their field names (e.g. NF4's
    `packed`, `absmax`, `nested_absmax`; AWQ's `qweight`, `qzeros`, `scales`); `bias` [out_features] in
    the model's dtype.  `prepared`: the weight's load-time form for the kernels (`prepare`: the CPU backend's
    form on CPU, the int4 GEMV layout on CUDA), or None.  The int4 GEMV layout is held in place of `qweight` and
    `qzeros` (buffers `prepared_words`, `prepared_zeros`); moving the module, saving or loading a state dict
    gives it AWQ's tensors back."""

    FORMAT: Format  # set on each format's subclass (`module_class`)
    prepared = None
    kind = None  # the backend `prepare` chose (`kernels.choose_backend`), for activations on `_kind_for`
    _kind_for = None  # (device, dtype)
    _forced = None  # a backend `forced_backend` imposes
    _held: dict[str, str] = {}  # field of `prepared` -> the buffer holding it, while it stands in for the weight's
    _replaced: tuple[str, ...] = ()  # the weight's fields `prepared` stands in for (freed while it is held)

    def __init__(self, name: str, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype,
                 params: dict[str, Any]):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.has_bias, self.dtype, self.params = has_bias, dtype, dict(params)
        try:
            stored = self.FORMAT.stored_tensors(name, out_features, in_features, self.params)
        except ValueError as e:
            raise Qwen2qError(f"{name}: {e}") from None
        self.suffixes = tuple(n[len(name) + 1:] for n in stored)
        self.bias = None
        self._incoming: dict[str, torch.Tensor] = {}
        self._fields: tuple[str, ...] = ()
        self._plain: dict[str, Any] = {}  # the weight object's fields that are not tensors
        self._weight_type = None

    def load_checkpoint_tensor(self, suffix: str, tensor: torch.Tensor) -> None:
        if suffix == "bias":
            self.bias = nn.Parameter(tensor.to(self.dtype), requires_grad=False)
        elif suffix in self.suffixes:
            self._incoming[f"{self.name}.{suffix}"] = tensor
        else:
            raise Qwen2qError(f"{self.name}: unexpected checkpoint tensor {self.name}.{suffix} for {type(self).__name__}")

    def finish_loading(self) -> None:
        missing = [s for s in self.suffixes if f"{self.name}.{s}" not in self._incoming]
        if missing or (self.has_bias and self.bias is None):
            missing += ["bias"] if self.has_bias and self.bias is None else []
            raise Qwen2qError(f"checkpoint lacks {', '.join(f'{self.name}.{s}' for s in missing)}")
        try:
            q = self.FORMAT.from_state_dict(self._incoming, self.name)
        except ValueError as e:
            raise Qwen2qError(f"{self.name}: {e}") from None
        stored = list(self.FORMAT.shape(q))
        if stored != [self.out_features, self.in_features]:  # e.g. NF4's shape lives in its quant_state data
            raise CheckpointError(f"{self.name}: its {self.FORMAT.name} tensors hold a {stored} weight, not the "
                                  f"linear's [{self.out_features}, {self.in_features}] that config.json implies")
        self._weight_type = type(q)
        self._fields = tuple(f.name for f in dataclasses.fields(q))
        for field in self._fields:
            value = getattr(q, field)
            if isinstance(value, torch.Tensor):
                # torch's CPU kernels read weights with aligned vector loads; safetensors hands tensors over
                # 8 bytes off a 64-byte boundary, so those are copied once (the copy replaces them)
                self.register_buffer(field, kernels.aligned(value) if value.device.type == "cpu" else value)
            else:  # kept apart from the module's attributes: NF4's `dtype` is not the model's
                self._plain[field] = value
        self._incoming = {}

    def weight_q(self):
        """The format's weight object, built from this module's buffers (on their current device); rebuilt from
        `prepared` (a new copy, `kernels.restore`) while the module holds that in place of some of them."""
        if self._held:
            return kernels.restore(self.prepared)
        fields = {f: self._plain[f] if f in self._plain else getattr(self, f) for f in self._fields}
        return self._weight_type(**fields)

    def prepare(self, cpu_cache: str | None = None, workspace: kernels.Workspace | None = None) -> None:
        """Make `prepared` for the module's current device and dtype (none off CPU or outside bf16); see
        `qwen2q.kernels.prepare` for `cpu_cache` and `workspace`.  A prepared form that replaces some of the
        weight's tensors (`kernels.replaces`: an int4 weight's GEMV layout on CUDA) is then held in their place,
        so the weight's bytes are on the device once."""
        self._release_prepared()
        self.prepared = kernels.prepare(self.FORMAT, self.weight_q(), self.dtype, cpu_cache, workspace)
        device = next((self._buffers[f].device for f in self._fields if f in self._buffers), torch.device("cpu"))
        self.kind = kernels.choose_backend(device, self.dtype, self.prepared)
        self._kind_for = (device, self.dtype)
        if replaced := kernels.replaces(self.prepared):
            self._hold_prepared(replaced)

    def _hold_prepared(self, replaced: tuple[str, ...]) -> None:
        """Keep `prepared`'s tensors as buffers (non-persistent: `.to()` moves them, `state_dict` writes the
        checkpoint's tensors instead) and free the weight's `replaced` ones."""
        held = {}
        for field in dataclasses.fields(self.prepared):
            t = getattr(self.prepared, field.name)
            if not isinstance(t, torch.Tensor):
                continue
            shared = next((f for f in self._fields if f not in replaced and self._buffers.get(f) is t), None)
            if shared is None:
                shared = f"prepared_{field.name}"
                self.register_buffer(shared, t, persistent=False)
            held[field.name] = shared
        for f in replaced:
            del self._buffers[f]
        self._held, self._replaced = held, replaced

    def share_held(self, field: str, tensor: torch.Tensor) -> None:
        """Hold `tensor` for the held form's `field` in place of the module's own copy, which is freed: equal to it,
        but stored elsewhere (a view into storage that a group of modules shares, `qwen2q.fused`)."""
        name = self._held.get(field)
        if name is None or not name.startswith("prepared_"):
            raise ValueError(f"{self.name}: holds no {field!r} of its own to share")
        own = getattr(self.prepared, field)
        same_kind = (tensor.shape, tensor.dtype, tensor.device) == (own.shape, own.dtype, own.device)
        if not same_kind or not torch.equal(tensor, own):
            raise ValueError(f"{self.name}: the {field} to share is not the held one")
        self.prepared = dataclasses.replace(self.prepared, **{field: tensor})
        self._buffers[name] = tensor

    def _release_prepared(self) -> None:
        """Give the weight back its own tensors, rebuilt from the held `prepared`, and drop the prepared form's
        buffers; nothing when no form is held."""
        if not self._held:
            return
        w = kernels.restore(self.prepared)
        for name in self._held.values():
            if name.startswith("prepared_"):
                del self._buffers[name]
        for f in self._replaced:
            self.register_buffer(f, getattr(w, f))
        self._held, self._replaced = {}, ()
        self.prepared, self.kind, self._kind_for = None, None, None

    def _apply(self, fn, recurse=True):
        names = (*self._fields, *self._held.values())
        before = [self._buffers.get(n) for n in names]
        result = super()._apply(fn, recurse)
        if any(self._buffers.get(n) is not t for n, t in zip(names, before)):
            # made from the tensors just replaced (e.g. moved to another device): a held form is turned back
            # into the weight's own tensors where they now are
            if self._held:  # first the held form where it now is: if the rebuild fails, the module stays whole
                self.prepared = dataclasses.replace(self.prepared,
                                                    **{f: self._buffers[n] for f, n in self._held.items()})
                self.kind, self._kind_for = None, None
                self._release_prepared()
            self.prepared, self.kind, self._kind_for = None, None, None
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # While a form is held, the checkpoint's tensors are rebuilt on the module's device (+0.5 byte per weight
        # for as long as the state dict is kept: move it to CPU module by module to save a model that barely fits).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._held:  # the checkpoint's tensors, not the form the kernels read
            w = self.weight_q()
            for f in self._replaced:
                destination[prefix + f] = getattr(w, f)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._release_prepared()  # the loaded tensors replace the checkpoint's own; prepare again to hold a form
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        kind = self._forced or (self.kind if self._kind_for == (x.device, x.dtype) else None)  # None: choose now
        w = None if self._held else self.weight_q()  # None: `prepared` stands in for it
        return kernels.linear(self.FORMAT, x, w, self.bias, self.prepared, kind)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


@functools.cache
def module_class(fmt: Format) -> type[QuantLinear]:
    """The QuantLinear subclass for `fmt`, named as the format says (e.g. NF4Linear)."""
    return type(fmt.module_name, (QuantLinear,), {"FORMAT": fmt, "__doc__": QuantLinear.__doc__})


QUANTIZABLE = (*LINEAR_NAMES, HEAD)


def swap_linears(model: nn.Module, scheme, dtype: torch.dtype) -> list[QuantLinear]:
    """Replace the decoder layers' nn.Linear children (and lm_head, when it is not the embedding table)
    with empty quantized modules of the format that `scheme.format_for(name)` gives each (None: left in
    full precision); return them, ready for `load_checkpoint_tensor`."""
    swapped = []
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", True)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or child_name not in QUANTIZABLE or (full == HEAD and tied):
                continue
            chosen = scheme.format_for(full)
            if chosen is None:
                continue
            fmt, params = chosen
            q = module_class(fmt)(full, child.in_features, child.out_features, child.bias is not None, dtype, params)
            setattr(module, child_name, q)
            swapped.append(q)
    return swapped


@contextlib.contextmanager
def forced_backend(model: nn.Module, kind: str):
    """Inside the block, run every quantized linear of `model` on backend `kind` (in practice "reference": to compare
    a loaded model's backends, in tests and benchmarks), whatever each chose when it was prepared."""
    if kind not in ("reference", "cpu", "triton"):
        raise ValueError(f"backend {kind!r}; use 'reference', 'cpu' or 'triton'")
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in modules:
        m._forced = kind
    try:
        yield
    finally:
        for m in modules:
            m._forced = None


def prepare_kernels(modules: list[QuantLinear], cpu_cache: str | None = None) -> None:
    """`prepare` every module, sharing one scratch workspace (a module moved back to CPU after loading runs the
    reference until this is called again).  `cpu_cache` None or "bf16" (keep a bf16 copy of every weight)."""
    workspace = kernels.Workspace()
    for module in modules:
        module.prepare(cpu_cache, workspace)


def quantize_linear(scheme, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantize linear `name`'s weight [out, in] into its checkpoint tensors, in the
    format `scheme.format_for(name)` gives it."""
    fmt, params = scheme.format_for(name)
    try:
        fmt.check_shape(*weight.shape, params)
    except ValueError as e:
        raise Qwen2qError(f"{name}.weight: {e} (or keep it in full precision with --skip "
                          f"{name.rsplit('.', 1)[-1]})") from None
    try:
        return fmt.to_state_dict(fmt.quantize(weight, params), name)
    except ValueError as e:
        raise Qwen2qError(f"{name}.weight: {e}") from None
