"""Click options shared by the `qwen2q` command and the dev commands (`python dev ...` from a checkout).

Each shared option is defined once, here, so that it has one name, one meaning and one default
wherever it appears: `--seq-len` is the evaluation window in `qwen2q eval` and in `compare-peers` alike.
A decorator adds its option(s) to a click command:

    @click.command()
    @seq_len_option
    @max_windows_option
    @json_option
    def cmd(seq_len, max_windows, json_out): ...
"""
from __future__ import annotations

import click

from qwen2q.sampling import SamplingParams

SAMPLING = SamplingParams()  # the API's defaults, so `qwen2q generate` and `m.generate()` draw alike


def check_device(ctx, param, value):
    """Refuse a bad --device while parsing, before anything is read (qwen2q.devices says why)."""
    from qwen2q.devices import parse_device

    parse_device(value)
    return value


def load_options(f):
    """--device, --dtype, --allow-pickle, --allow-non-finite, --cpu-cache: how a checkpoint is loaded
    (`qwen2q.load`); --cpu-cache reaches the command as None or "bf16"."""
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...",
                     callback=check_device)(f)
    f = click.option("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model.bin checkpoints (can run code).")(f)
    f = click.option("--allow-non-finite", is_flag=True, help="Load weights holding NaN/Inf (refused by default).")(f)
    f = click.option("--cpu-cache", type=click.Choice(["none", "bf16"]), default="none", show_default=True,
                     callback=lambda ctx, param, value: None if value == "none" else value,
                     help="bf16: keep a dequantized bf16 copy of every quantized linear (CPU, bf16 models): "
                          "bf16 speed, which NF4 otherwise falls well short of, for 2 bytes per quantized weight "
                          "more memory (0.7 GB for a 0.5B model, 13 GB for 7B).")(f)
    return f


def sampling_options(f):
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed: how tokens are drawn (`SamplingParams`)."""
    f = click.option("--max-new-tokens", default=SAMPLING.max_new_tokens, show_default=True,
                     type=click.IntRange(min=0))(f)
    f = click.option("--temperature", default=SAMPLING.temperature, show_default=True, type=click.FloatRange(min=0),
                     help="0 = greedy.")(f)
    f = click.option("--top-k", default=SAMPLING.top_k, show_default=True, type=click.IntRange(min=0),
                     help="0 = off.")(f)
    f = click.option("--top-p", default=SAMPLING.top_p, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True))(f)
    f = click.option("--seed", default=SAMPLING.seed, type=int, help="Seed for sampling.")(f)
    return f


def dataset_option(f):
    """--dataset / -d: the evaluation text (`qwen2q.evals.data.load_text`)."""
    return click.option("--dataset", "-d", default="auto", show_default=True,
                        help="auto, wikitext2, pydoc, or a text file / folder.")(f)


def seq_len_option(f):
    """--seq-len: the evaluation window (`qwen2q.evals.perplexity.windows`)."""
    return click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(min=2),
                        help="Window length (capped at the model's context).")(f)


def max_windows_option(f):
    """--max-windows: how many windows of the text are scored (default: all)."""
    return click.option("--max-windows", default=None, type=click.IntRange(min=1),
                        help="Evaluate only the first N windows.")(f)


def json_option(f):
    """--json FILE: where every figure and setting is written (passed to the command as `json_out`)."""
    return click.option("--json", "json_out", type=click.Path(), default=None,
                        help="Write every figure and setting here.")(f)
