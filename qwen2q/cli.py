"""The `qwen2q` command.  Commands parse options, call the library and print; nothing more."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from qwen2q.cli_options import (
    check_device,
    dataset_option,
    json_option,
    load_options,
    max_windows_option,
    sampling_options,
    seq_len_option,
)
from qwen2q.errors import Qwen2qError
from qwen2q.interrupts import raise_terminated

MODEL_HELP = "Checkpoint directory (default: the embedded tiny model)."
EMBEDDED = "qwen2q:tiny"  # how a user names the embedded model where a path is required (quantize's SRC)


def _model_path(text: str | None) -> str | None:
    """A model argument as given, with the embedded model's name replaced by its directory."""
    if text == EMBEDDED:
        from qwen2q.files import DEFAULT_MODEL

        return str(DEFAULT_MODEL)
    return text


def _model_argument(f):
    return click.argument("model", required=False, type=click.Path(), metavar="[MODEL]",
                          callback=lambda ctx, param, value: _model_path(value))(f)


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (2 for bad usage), Ctrl-C into 130."""

    def main(self, *args, **kwargs):
        signal.signal(signal.SIGTERM, raise_terminated)  # `kill` cleans up like Ctrl-C: no partial output left
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # `qwen2q cmd` with nothing: show the help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Qwen2qError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


ExitCodeGroup = _Group  # public name: the dev commands (dev/ in a checkout) run under the same exit-code policy


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen2q")
def main():
    """qwen2q: quantize, evaluate and run Qwen2 language models.

    \b
    Examples:
      qwen2q info                               # the embedded tiny model
      qwen2q generate ./Qwen2-0.5B --prompt "def fib(n):"
      qwen2q chat ./Qwen2-0.5B-Instruct
    """


@main.command()
@_model_argument
def info(model):
    """Show architecture, parameter count, dtype, quantization and size of MODEL.

    \b
    Example:
      qwen2q info ./Qwen2-7B-Instruct-nf4
    """
    from qwen2q.files import DEFAULT_MODEL
    from qwen2q.info import describe, module_table

    from qwen2q.evals.table import format_fields

    click.echo(format_fields(describe(model or DEFAULT_MODEL)))
    table = module_table(model or DEFAULT_MODEL)
    if table is not None:
        click.echo("\nformat of each linear:\n" + table)


def _load(model, device, dtype, allow_pickle, allow_non_finite=False, cpu_cache=None):
    import qwen2q

    return qwen2q.load(model, device=device, dtype=dtype, allow_pickle=allow_pickle, allow_non_finite=allow_non_finite,
                       cpu_cache=cpu_cache)


@main.command()
@_model_argument
@click.option("--prompt", "-p", required=True, help="Text to continue (use --chat to wrap it as a user message).")
@click.option("--chat", "as_chat", is_flag=True, help="Render the prompt through the chat template first.")
@sampling_options
@load_options
def generate(model, prompt, as_chat, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, allow_pickle,
             allow_non_finite, cpu_cache):
    """Continue a prompt, streaming the text to stdout; tokens/s go to stderr.

    \b
    Examples:
      qwen2q generate --prompt "The capital of France is"
      qwen2q generate ./Qwen2-0.5B-Instruct --chat -p "Write a haiku" --temperature 0.7 --top-p 0.9 --seed 1
    """
    import warnings

    from qwen2q.console import dim, speed

    m = _load(model, device, dtype, allow_pickle, allow_non_finite, cpu_cache)
    if as_chat:
        prompt = m.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    n_prompt = len(m.tokenizer.encode(prompt))
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # e.g. stopped at the model's context
        warnings.simplefilter("always")
        new = m.generate_ids(prompt, max_new_tokens, temperature, top_k, top_p, seed, stream=True)
    elapsed = time.perf_counter() - t0
    click.echo("")
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    dim(f"[{n_prompt} prompt tokens, {speed(len(new), elapsed)}, {m.dtype}, {m.device}]")


@main.command()
@_model_argument
@click.option("--system", default=None, help="System message (default: the template's own).")
@sampling_options
@load_options
def chat(model, system, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, allow_pickle, allow_non_finite,
         cpu_cache):
    """Talk to MODEL in the terminal through its ChatML template.

    \b
    Commands: /help, /reset (clear the conversation; --system stays), /exit or /quit (or Ctrl-D).
    Ctrl-C stops a reply (what it said so far stays in the conversation); at the prompt Ctrl-C clears
    the line and a second one leaves.  Lines are edited with readline; their history lasts for the
    session and is not saved.  Each reply is followed by its speed on stderr.

    Replies alone go to stdout, so piped input (`qwen2q chat < questions.txt`) gets no banner or prompt.
    When the conversation outgrows the model's context, the oldest turns are dropped (the system
    message stays) with a note on stderr; a message that does not fit even alone is not sent (an
    `error:` line, and exit status 1 at the end).

    \b
    Example:
      qwen2q chat ./Qwen2.5-Coder-0.5B-Instruct --temperature 0.7 --top-p 0.8
    """
    from qwen2q.api import DEFAULT_MODEL
    from qwen2q.chat_repl import ChatLoop
    from qwen2q.sampling import SamplingParams

    m = _load(model, device, dtype, allow_pickle, allow_non_finite, cpu_cache)
    if m.tokenizer.chat_template is None:
        raise Qwen2qError(f"{m.path} has no chat template (chat_template.jinja or tokenizer_config.json); "
                          "use `qwen2q generate`")
    loop = ChatLoop(m, SamplingParams(max_new_tokens, temperature, top_k, top_p, seed), system,
                    interactive=sys.stdin.isatty())
    status = loop.run(EMBEDDED if m.path == DEFAULT_MODEL else str(m.path))
    if status:
        sys.exit(status)


CALIBRATION_OPTIONS = ("calib_data", "calib_samples", "calib_seq_len", "chat_template", "search_tokens", "rounding",
                       "act_order", "calib_dtype", "device")


def _check_quantize_options(ctx: click.Context, method: str | None, awq_scales: bool, recipe=None) -> None:
    """Refuse flags that were given but that this method or recipe would ignore (what the library never
    sees); `qwen2q.quantization.check` validates the rest."""
    given = {name for name in ctx.params if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if (method is None) == (recipe is None):
        raise click.UsageError("give --method (-m) or --recipe, one of them")
    if recipe is not None:
        flags = sorted(n for n in ("group_size", "rounding", "act_order", "awq_scales", "layout") if n in given)
        if flags:
            flag = "format" if flags[0] == "layout" else flags[0].replace("_", "-")
            raise Qwen2qError(f"--{flag} goes with --method; with --recipe each rule says its "
                              "format, parameters and algorithm")
        ignored = sorted(n for n in CALIBRATION_OPTIONS if n in given and not recipe.calibrated)
        if ignored:
            raise Qwen2qError(f"--{ignored[0].replace('_', '-')} is a calibration option, and no rule of this "
                              "recipe calibrates")
        return
    if awq_scales and method != "nf4":
        raise Qwen2qError(f"--awq-scales goes with --method nf4 (--method awq searches scales already), not {method}")
    if "group_size" in given and method not in ("int4", "awq"):
        raise Qwen2qError(f"--group-size applies to --method int4 and awq; {method} has fixed blocks "
                          f"({'64 weights per absmax' if method == 'nf4' else 'one scale per output row'})")
    calibrated = method == "awq" or awq_scales
    ignored = sorted(n for n in CALIBRATION_OPTIONS if n in given and not calibrated)
    if ignored:
        flag = "--" + ignored[0].replace("_", "-")
        raise Qwen2qError(f"{flag} is a calibration option: it goes with --method awq or --method nf4 --awq-scales")


@main.command()
@click.argument("src", type=click.Path(), metavar="SRC")
@click.argument("dst", type=click.Path(), metavar="DST", required=False)
@click.option("--method", "-m", type=click.Choice(["nf4", "int8", "int4", "awq"]), default=None,
              help="nf4: bitsandbytes NF4 + double quant; int8: bitsandbytes int8 storage; "
                   "int4: AWQ-layout group-wise uint4, round-to-nearest; awq: the same layout, calibrated.  "
                   "Give this or --recipe.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A JSON recipe instead of --method: ordered rules giving each linear a format, its parameters "
                   "and an algorithm (rtn, awq, awq-gptq, awq-scales, gptq), so one checkpoint may hold several "
                   "formats; see the README.")
@click.option("--kl-budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="KL",
              help="Mixed precision: the smallest checkpoint whose KL against SRC (mean per token; its 95% upper "
                   "bound over 16 held-out windows of the calibration text, or of --kl-data) stays under KL, a "
                   "format per module group from --choices.")
@click.option("--kl-data", default=None, metavar="FILE|DIR|HUB_ID",
              help="Mixed precision: the text the KL budget must hold on (a sample of what the model will read; "
                   "its first 16 windows are measured).  [default: held-out windows of the calibration text]")
@click.option("--target-bits", type=click.FloatRange(min=0, min_open=True), default=None, metavar="BITS",
              help="Mixed precision: the least predicted KL at BITS bits per weight of the linears the search "
                   "chooses for (every decoder linear, and lm_head unless it is kept).")
@click.option("--choices", default=None, metavar="LIST",
              help="Mixed precision: the formats a module group may take, from int4-ch (one scale per row; "
                   "compressed-tensors only), int4-g128, int4-g64, int4-g32, int8, nf4 (--format native only), "
                   "bf16.  [default: int4-g128,int4-g32,int8,bf16]")
@click.option("--profile", "profile_path", type=click.Path(), default=None, metavar="DIR|FILE",
              help="Mixed precision: reuse the sensitivity profile of an earlier mixed run (its output directory "
                   "or qwen2q_mixed.json) instead of measuring it again; choices it lacks are measured and added.")
@click.option("--keep-lm-head", is_flag=True,
              help="Mixed precision: keep lm_head in the source's precision.  [default: when lm_head is not the "
                   "embedding table, it is one more group the search gives a format (compressed-tensors only)]")
@click.option("--format", "layout", type=click.Choice(["native", "compressed-tensors"]), default=None,
              help="Output layout: native (bitsandbytes for nf4/int8, AutoAWQ GEMM for int4/awq) or compressed-tensors "
                   "pack-quantized (int4/awq: asymmetric W4A16; int8: W8A16 per channel), what llm-compressor writes "
                   "and vLLM serves.  [default: native; compressed-tensors with --kl-budget/--target-bits]")
@click.option("--group-size", default=128, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Input channels per scale/zero (int4 and awq only).")
@click.option("--skip", multiple=True, metavar="MODULE",
              help="Keep these linears in full precision (name, suffix or prefix, repeatable; must match a "
                   "linear); lm_head is kept (only mixed precision may quantize it).")
@click.option("--max-shard-size", default="4GB", show_default=True, help="Largest output shard, e.g. 500MB, 4GB.")
@click.option("--force", is_flag=True,
              help="Replace DST if it holds a checkpoint qwen2q wrote (anything else is never replaced).")
@click.option("--allow-pickle", is_flag=True, help="Allow a pytorch_model.bin source (loading pickle can run code).")
@click.option("--calib-data", default=None, metavar="FILE|DIR|HUB_ID",
              help="awq: calibration text (.txt/.jsonl file, folder, or datasets hub id); "
                   "default $QWEN2Q_DATA/calib/wiki.utf8 or ../shared/data/calib/wiki.utf8.")
@click.option("--calib-samples", default=128, show_default=True, type=click.IntRange(min=1), help="awq: samples.")
@click.option("--calib-seq-len", default=512, show_default=True, type=click.IntRange(min=2), help="awq: tokens per sample.")
@click.option("--chat-template", is_flag=True, help="awq: render calibration text through the chat template.")
@click.option("--search-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="awq: tokens the scale search scores (statistics use all calibration tokens).")
@click.option("--rounding", type=click.Choice(["gptq", "nearest"]), default=None,
              help="awq: after the scale search, GPTQ error-compensating rounding onto the int4 grid (default), or "
                   "clip search + round to nearest (AutoAWQ's AWQ exactly).  nf4 --awq-scales: nearest only.")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="awq with gptq rounding: sweep the columns by decreasing input energy (GPTQ's act order, with "
                   "the group grids fixed up front so the layout is unchanged).")
@click.option("--calib-dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="awq and mixed precision: precision of the calibration forwards (capture, scale search, next "
                   "layer's input); statistics, scales and GPTQ stay fp32.  auto: bfloat16 where bf16 matmuls are "
                   "native (CUDA; CPUs with AVX-512), float32 elsewhere (an AVX2-only CPU runs bf16 GEMMs about "
                   "6x slower than fp32).")
@click.option("--awq-scales", is_flag=True,
              help="nf4: run AWQ's calibrated scale search first and fold the scales into the norms and up_proj "
                   "(still a plain bitsandbytes NF4 checkpoint; takes the awq calibration options).")
@click.option("--device", default="cpu", show_default=True, help="awq: compute device (cpu, cuda, ...).",
              callback=check_device)
@click.option("--allow-non-finite", is_flag=True,
              help="nf4/int8/int4: copy NaN/Inf in the unquantized tensors (refused by default).")
@click.pass_context
def quantize(ctx, src, dst, method, recipe_file, kl_budget, target_bits, kl_data, choices, profile_path, keep_lm_head, layout, group_size, skip, max_shard_size, force, allow_pickle, calib_data, calib_samples,
             calib_seq_len, chat_template, search_tokens, rounding, act_order, calib_dtype, awq_scales, device,
             allow_non_finite):
    """Quantize checkpoint SRC into the new directory DST.

    SRC and DST are both required; name the embedded tiny model as qwen2q:tiny.  Streams shard by
    shard (peak memory near one output shard), writes into a hidden temporary directory beside DST
    and renames it into place only when complete.  A non-empty DST is replaced only with --force, and
    only if it is a checkpoint qwen2q wrote; a second run into the same DST is refused while one runs.
    The result loads in qwen2q, and in transformers (+ bitsandbytes) or AutoAWQ/vLLM, whose formats it uses.

    \b
    Examples:
      qwen2q quantize qwen2q:tiny ./tiny-nf4 --method nf4
      qwen2q quantize ./Qwen2-0.5B-Instruct ./q-awq -m awq --calib-data wiki.txt --calib-samples 48 --chat-template
      qwen2q quantize ./Qwen2-0.5B-Instruct ./q-awq-autoawq -m awq --rounding nearest --calib-samples 48
      qwen2q quantize ./Qwen2-0.5B-Instruct ./q-nf4-awq -m nf4 --awq-scales --calib-samples 48
      qwen2q quantize ./Qwen2-7B-Instruct ./Qwen2-7B-Instruct-int4 --method int4 --group-size 128
      qwen2q quantize ./Qwen2-7B-Instruct ./q-awq-ct -m awq --format compressed-tensors --calib-samples 48
      qwen2q quantize ./Qwen2-0.5B ./q8 -m int8 --skip down_proj --force
      qwen2q quantize ./Qwen2-0.5B ./q-mixed --recipe int8-down-awq-rest.json --calib-samples 48
      qwen2q quantize ./Qwen2-0.5B ./q-kl02 --kl-budget 0.02
      qwen2q quantize ./Qwen2-0.5B ./q-kl05 --kl-budget 0.05 --profile ./q-kl02
      qwen2q quantize ./Qwen2-0.5B ./q-4.5 --target-bits 4.5 --choices int4-g128,int4-g32,int8
    """
    import dataclasses

    from qwen2q.qconfig import DEFAULT_SKIP, QuantConfig
    from qwen2q.quantization import quantize as run
    from qwen2q.recipe import read_recipe

    if dst is None:
        raise click.UsageError(f"quantize needs SRC and DST (got only {src}); to quantize the embedded model, "
                               f"name it: qwen2q quantize {EMBEDDED} {src} ...")
    max_shard_bytes = _parse_size(max_shard_size)
    if kl_budget is not None or target_bits is not None:
        _quantize_mixed(ctx, src, dst, kl_budget, target_bits, kl_data, choices, profile_path, keep_lm_head, layout,
                        max_shard_bytes)
        return
    given = [f for f, v in (("--choices", choices), ("--profile", profile_path), ("--kl-data", kl_data),
                            ("--keep-lm-head", keep_lm_head or None)) if v is not None]
    if given:
        raise Qwen2qError(f"{given[0]} goes with --kl-budget or --target-bits")
    layout = layout or "native"
    if recipe_file is not None:
        recipe = read_recipe(recipe_file)
        recipe = dataclasses.replace(recipe, skip=tuple(dict.fromkeys((*recipe.skip, *skip))))
    else:
        recipe = None
    _check_quantize_options(ctx, method, awq_scales, recipe)
    if recipe is None:
        recipe = QuantConfig(method, group_size=int(group_size), skip=tuple(DEFAULT_SKIP) + tuple(skip), layout=layout)
    calibration = None
    if method == "awq" or awq_scales or (recipe_file is not None and recipe.calibrated):
        from qwen2q.calibrate.pipeline import CalibrationSettings

        calibration = CalibrationSettings(calib_data, calib_samples, calib_seq_len, chat_template, search_tokens,
                                          rounding=rounding, act_order=act_order, compute_dtype=calib_dtype)
    report = run(_model_path(src), dst, recipe, calibration, device=device, force=force,
                 max_shard_bytes=max_shard_bytes, allow_pickle=allow_pickle, allow_non_finite=allow_non_finite)
    _print_report(report)


MIXED_REFUSES = ("method", "recipe_file", "group_size", "skip", "rounding", "act_order", "awq_scales",
                 "allow_non_finite")


def _quantize_mixed(ctx, src, dst, kl_budget, target_bits, kl_data, choices, profile_path, keep_lm_head, layout,
                    max_shard_bytes) -> None:
    """--kl-budget / --target-bits: `qwen2q.mixed.quantize_mixed`, then its report."""
    from qwen2q.calibrate.pipeline import CalibrationSettings
    from qwen2q.mixed import DEFAULT_CHOICES, quantize_mixed

    given = {n for n in ctx.params if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT}
    if kl_budget is not None and target_bits is not None:
        raise Qwen2qError("give --kl-budget or --target-bits, not both")
    refused = [n for n in MIXED_REFUSES if n in given]
    if refused:
        flag = {"recipe_file": "recipe"}.get(refused[0], refused[0]).replace("_", "-")
        raise Qwen2qError(f"--{flag} does not go with --kl-budget/--target-bits (mixed precision chooses each "
                          "module's format and algorithm itself)")
    p = ctx.params
    calibration = CalibrationSettings(p["calib_data"], p["calib_samples"], p["calib_seq_len"], p["chat_template"],
                                      p["search_tokens"], compute_dtype=p["calib_dtype"])
    report = quantize_mixed(_model_path(src), dst, kl_budget=kl_budget, target_bits=target_bits,
                            choices=choices or DEFAULT_CHOICES, layout=layout or "compressed-tensors",
                            calibration=calibration, kl_data=kl_data, profile=profile_path, keep_head=keep_lm_head,
                            device=p["device"], force=p["force"],
                            max_shard_bytes=max_shard_bytes, allow_pickle=p["allow_pickle"],
                            log=lambda line: click.echo(line, err=True))
    rows = [("budget", report.budget),
            ("choices", ", ".join(f"{n} {o}" for o, n in sorted(report.counts().items()))),
            ("KL", f"{report.measured_kl:.5f} measured on held-out windows, 95% upper bound {report.kl_bound:.5f} "
                   f"(predicted {report.predicted_kl:.5f})"),
            ("bits / weight", f"{report.bits_per_weight:.3f} (every decoder linear{', and lm_head' if 'lm_head' in report.assignment else ''}, "
                              "bf16 ones included)"),
            ("time", f"{report.seconds:.1f} s (profile {report.profile_seconds:.1f} s, "
                     f"{_passes(report.attempts)})")]
    _print_report(report.report, rows)
    from qwen2q.info import module_table

    table = module_table(report.report.dst)
    if table is not None:
        click.echo("\nformat of each linear:\n" + table)


def _passes(attempts) -> str:
    """"2 trial passes, 1 final pass": how many times a mixed run made its assignment."""
    counts = {kind: sum(a.kind == kind for a in attempts) for kind in ("trial", "final")}
    return ", ".join(f"{n} {kind} pass{'es' * (n != 1)}" for kind, n in counts.items() if n)


def _print_report(report, mixed: list[tuple[str, str]] | None = None) -> None:
    """The conversion's report; `mixed`: a mixed-precision run's rows, which replace the bits and time
    rows (those count every decoder linear and the whole run)."""
    rows = [
        ("method", report.method),
        ("size before", f"{report.bytes_before / 2**20:,.1f} MiB"),
        ("size after", f"{report.bytes_after / 2**20:,.1f} MiB ({report.bytes_after / report.bytes_before:.1%})"),
        ("bits / weight", f"{report.bits_per_weight:.3f} (quantized linears, scales and statistics included)"),
        ("shards", str(report.shards)),
        ("time", f"{report.seconds:.1f} s"),
        ("peak RSS", f"{report.peak_rss_bytes / 2**20:,.0f} MiB"),
    ]
    if report.calibration is not None:
        rows.append(("calibration", report.calibration))
    if report.peak_device_bytes is not None:
        rows.append(("peak device", f"{report.peak_device_bytes / 2**20:,.0f} MiB"))
    if mixed is not None:
        rows = [r for r in rows if r[0] not in ("bits / weight", "time")] + mixed
    from qwen2q.evals.table import format_fields

    click.echo(f"wrote {report.dst}")
    click.echo(format_fields(rows, indent="  "))


@main.command("eval")
@click.argument("models", nargs=-1, type=click.Path(), metavar="[[NAME=]MODEL]...")
@click.option("--reference", "-r", type=click.Path(), default=None,
              help="bf16 checkpoint to measure drift against (KL, top-1, perplexity delta).")
@dataset_option
@seq_len_option
@max_windows_option
@json_option
@click.option("--plot", type=click.Path(), default=None, help="Draw drift by method into this PNG (needs matplotlib).")
@load_options
def eval_(models, reference, dataset, seq_len, max_windows, json_out, plot, device, dtype, allow_pickle,
          allow_non_finite, cpu_cache):
    """Perplexity of each MODEL, and with --reference its drift from that bf16 model.

    Each row is named by its folder (two folders of one name: by path), or as given: NAME=MODEL.

    Text: WikiText-2 raw test ($QWEN2Q_DATA or ../shared/data, else the `datasets` hub), tokenized once
    and cut into non-overlapping windows that each score their last L-1 tokens; with no WikiText-2
    available, "auto" falls back to CPython's pydoc topics.  The reference runs once per window: its
    logits are kept (up to 2 GiB in memory, then in a temporary folder while 2 GiB of disk stay free,
    deleted at the end) and replayed for every model.

    \b
    Examples:
      qwen2q eval ./q-nf4 --reference ./Qwen2-0.5B --max-windows 32 --seq-len 512
      qwen2q eval ./q-nf4 ./q-int8 ./q-int4 -r ./Qwen2-0.5B --json drift.json --plot drift.png
      qwen2q eval ./Qwen2-0.5B --dataset ./my-text.txt
      qwen2q eval rtn=./runs/1/q-int4 awq=./runs/2/q-int4 -r ./Qwen2-0.5B
    """
    from qwen2q.files import DEFAULT_MODEL
    from qwen2q.evals import harness
    from qwen2q.evals.data import load_text

    _check_output_files(json=json_out, plot=plot)
    if plot and not reference:
        raise Qwen2qError("--plot needs --reference (it draws drift against the reference)")
    models = [_named_model(m) for m in models] or [DEFAULT_MODEL]
    reference = _model_path(reference)
    text = load_text(dataset)
    result = harness.evaluate(models, text, reference=Path(reference) if reference else None, seq_len=seq_len,
                              max_windows=max_windows, device=device, dtype=dtype, allow_non_finite=allow_non_finite,
                              cpu_cache=cpu_cache)
    _report(result, json_out, plot)


def _named_model(arg: str):
    """MODEL, or NAME=MODEL (a name without '/' before the first '='; an existing path is always a path)
    -> Path, or (name, Path)."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name and not Path(arg).exists():
        return name, Path(_model_path(path))
    return Path(_model_path(arg))


def _check_output_files(**paths) -> None:
    """Refuse, before any work, an output file (--json, --plot) that could not be written at the end."""
    import os

    for option, path in paths.items():
        if path is None:
            continue
        p, flag = Path(path), "--" + option.replace("_", "-")
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir():
            raise Qwen2qError(f"{flag} {path} is a directory; give a file name")
        if not parent.is_dir():
            raise Qwen2qError(f"{flag} {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise Qwen2qError(f"{flag} {path}: not writable")
    if paths.get("plot"):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise Qwen2qError("--plot needs matplotlib (pip install 'qwen2q[plot]')") from None


def _report(result: dict, json_out, plot, extra_columns=()) -> None:
    """Print the evaluation table; write the JSON and the plot when asked."""
    from qwen2q.evals import harness

    click.echo(harness.format_table(result, extra_columns=extra_columns))
    if json_out:
        harness.write_json(result, json_out)
        click.echo(f"wrote {json_out}")
    if plot:
        harness.plot(result, plot)
        click.echo(f"wrote {plot}")


@main.command()
@dataset_option
@click.option("--max-windows", default=16, show_default=True, type=click.IntRange(min=1))
@json_option
@click.option("--plot", type=click.Path(), default=None, help="Draw drift by method into this PNG.")
@click.option("--calib-data", default=None, metavar="FILE|DIR|HUB_ID",
              help="Calibration text for the AWQ row (.txt/.jsonl file, folder, or datasets hub id); default "
                   "$QWEN2Q_DATA/calib/wiki.utf8 or ../shared/data/calib/wiki.utf8; without any, AWQ is skipped.")
def demo(dataset, max_windows, json_out, plot, calib_data):
    """Quantize the embedded model with every method and compare each with bf16, offline.

    Prints one table: method, bits/weight, size, perplexity, its delta, KL, top-1 agreement and
    quantize time.  Runs in a temporary directory; nothing is left behind.

    \b
    Example:
      qwen2q demo --json demo.json --plot demo.png
      qwen2q demo --calib-data ./my-calibration-text.txt
    """
    from qwen2q.calibrate.data import load_documents
    from qwen2q.evals import demo as demo_mod
    from qwen2q.evals.data import load_text

    _check_output_files(json=json_out, plot=plot)
    if calib_data is not None:
        load_documents(calib_data)  # a missing file or unreachable hub id fails now, not after the other methods
    result = demo_mod.run(load_text(dataset), max_windows=max_windows, calibration=calib_data)
    for note in result["notes"]:
        click.echo(note)
    _report(result, json_out, plot, extra_columns=("bits_per_weight", "quantize_seconds"))


@main.command()
@_model_argument
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--graph/--no-graph", "use_graph", default=None, help="CUDA graph for decode steps (default: on CUDA).")
@click.option("--compare-transformers", is_flag=True, help="Also time transformers' generate (unquantized models).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@load_options
def bench(model, prompt_len, new_tokens, use_graph, compare_transformers, json_out, device, dtype, allow_pickle,
          allow_non_finite, cpu_cache):
    """Prefill and decode tokens/s at batch 1, and peak memory.

    \b
    Examples:
      qwen2q bench ./Qwen2-7B-int4 --device cuda
      qwen2q bench ./Qwen2-7B --device cuda --compare-transformers
    """
    import json

    from qwen2q import bench as bench_mod

    _check_output_files(json=json_out)
    m = _load(model, device, dtype, allow_pickle, allow_non_finite, cpu_cache)
    result = bench_mod.run(m.model, prompt_len, new_tokens, use_graph)
    if compare_transformers:
        result.update(bench_mod.run_transformers(m.path, device, m.dtype, prompt_len, new_tokens))
    click.echo(f"{m.path.name} on {result['device_name']} ({m.dtype}, CUDA graph: {result['cuda_graph']})")
    click.echo(f"  prefill  {result['prefill_tokens_per_s']:10.1f} tokens/s  ({prompt_len} tokens)")
    click.echo(f"  decode   {result['decode_tokens_per_s']:10.1f} tokens/s  ({new_tokens} tokens)")
    if "generate_tokens_per_s" in result:
        click.echo(f"  transformers generate {result['generate_tokens_per_s']:.1f} tokens/s")
    click.echo(f"  peak memory {result['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except (ValueError, OverflowError):  # "abcMB", "nanMB", "infGB"
                break
    raise Qwen2qError(f"--max-shard-size {text!r} is not a size like 500MB or 4GB")


if __name__ == "__main__":
    main()
