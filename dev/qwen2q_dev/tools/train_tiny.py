"""Train the tiny Qwen2 that ships inside the package (`qwen2q/assets/qwen2-tiny`).

\b
    python dev train-tiny \\
        --corpus ../shared/data/calib/wiki.utf8 --corpus ../shared/data/calib/c4.utf8 \\
        --corpus ../shared/data/calib/technical.utf8 --out qwen2q/assets/qwen2-tiny

It gives the test suite and the examples a real (if weak) language model that loads like any Qwen2
checkpoint, in transformers and in qwen2q, without downloading anything.  Everything is fixed by the
arguments and the seed: the tokenizer, the batches (drawn from a seeded generator, never from a time
budget) and the weights, so the same command on the same torch build gives the same files.

1. A byte-level BPE tokenizer in Qwen2's layout (NFC normalizer, Qwen2's split regex, byte-level
   pre-tokenizer and decoder, `<|endoftext|>` `<|im_start|>` `<|im_end|>` specials, ChatML template).
2. A small Qwen2ForCausalLM (qwen2q's own model code) trained in fp32 with AdamW and a cosine schedule
   on random windows of the corpora, each document followed by `<|endoftext|>`.
3. The directory in Hugging Face format (bf16 safetensors) and a model card with the perplexity of
   the saved weights on WikiText-2 (raw test split) and on CPython's `pydoc_data.topics`, next to an
   add-one unigram baseline.  Neither evaluation text is in the training data; the script checks that
   no 13-word run of them occurs in the corpora and reports it.

The corpora are read where they lie and never copied into the output.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import sys
import time
import types
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from qwen2q.config import Qwen2Config
from qwen2q.errors import Qwen2qError
from qwen2q.evals.perplexity import perplexity, unigram_perplexity
from qwen2q.loader import load_model, save_model
from qwen2q.model import Qwen2ForCausalLM

# Qwen2's pre-tokenizer split pattern (tokenizer.json of every Qwen2 / Qwen2.5 checkpoint).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Qwen2-Instruct's chat template, unchanged.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def log(msg: str) -> None:
    click.echo(msg)


def find_data_dir() -> Path | None:
    """The shared data directory, as everything in qwen2q finds it (`qwen2q.textdata.data_folder`)."""
    from qwen2q.textdata import data_folder

    return data_folder()


# ----------------------------------------------------------------------------------------- data


def read_documents(path: Path) -> list[str]:
    """The documents of one corpus file.

    WikiExtractor files (`<doc ...>` ... `</doc>`): one document per article, the tags dropped.
    A file with no blank line (C4 style): one document per line.  Anything else: one document.
    """
    text = path.read_text(encoding="utf-8")
    if re.search(r"^<doc [^>]*>$", text, flags=re.M):
        docs = re.findall(r"^<doc [^>]*>\n(.*?)^</doc>$", text, flags=re.M | re.S)
    elif not re.search(r"\n[ \t]*\n", text):
        docs = text.split("\n")
    else:
        docs = [text]
    return [d.strip() for d in docs if d.strip()]


def pydoc_topics_text() -> str:
    """CPython's offline help text: every `pydoc_data.topics` entry, sorted by key, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def wikitext_plain(text: str) -> str:
    """WikiText's raw text with its ` @-@ `-style tokenization undone, for the overlap check only."""
    return re.sub(r" @(.)@ ", r"\1", text)


# ------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    if tok.get_vocab_size() != vocab_size:
        raise Qwen2qError(f"tokenizer reached only {tok.get_vocab_size()} of {vocab_size} entries; use a smaller --vocab-size")
    return tok


def write_tokenizer_files(tok, out: Path, seq_len: int) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    # The decoder's unused flags as Qwen2 writes them (the ByteLevel decoder ignores them).
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": seq_len,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    generation_config = {
        "bos_token_id": ids[ENDOFTEXT],
        "pad_token_id": ids[ENDOFTEXT],
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
    return ids


# ---------------------------------------------------------------------------------------- model


def model_config(args, ids: dict[str, int]) -> dict:
    """config.json as Qwen2 checkpoints write it (both the `torch_dtype` and the `dtype` spelling)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.seq_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def init_weights(model: Qwen2ForCausalLM, n_layers: int, std: float = 0.02) -> None:
    """N(0, std) for linears and the (tied) embedding, residual outputs scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine down to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, args) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=False,
        foreach=True,
    )
    gen = torch.Generator().manual_seed(args.seed)
    T, B = args.seq_len, args.batch_size
    offsets = torch.arange(T + 1)
    losses: list[float] = []
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - T - 1, (B,), generator=gen)
        chunk = stream[starts[:, None] + offsets]
        x, y = chunk[:, :-1], chunk[:, 1:]
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            log(
                f"step {step + 1:5d}/{args.steps}  loss {losses[-1]:.4f}  lr {lr:.2e}  gnorm {gnorm:.2f}  "
                f"{el:7.1f}s  {(step + 1) * B * T / el:6.0f} tok/s"
            )
    model.eval()
    tail = losses[-min(50, len(losses)) :]
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "final_loss": losses[-1], "final_loss_mean50": sum(tail) / len(tail)}


# ----------------------------------------------------------------------------------------- card


def write_card(out: Path, facts: dict) -> None:
    f = facts
    a = f["args"]
    wt, pd = f.get("wikitext"), f.get("pydoc")

    def ppl_row(name, r, u):
        return f"| {name} | {r['ppl']:.2f} | {u['ppl']:.1f} | {r['nll']:.4f} | {r['windows']} | {r['tokens']:,} |"

    rows = []
    if wt:
        rows.append(ppl_row("WikiText-2 raw, test split (`wiki.test.raw`, whole file as is)", wt["model"], wt["unigram"]))
    if pd:
        rows.append(ppl_row(f"CPython {f['python']} `pydoc_data.topics` (sorted keys, joined by blank lines)", pd["model"], pd["unigram"]))
    if not rows:
        rows.append("| (not measured: run without --no-eval) | | | | | |")
    ppl_table = "\n".join(
        [
            "| text | model ppl | unigram ppl | model NLL (nats/token) | windows | scored tokens |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    corpora = "\n".join(f"| `{c['path']}` | {c['documents']:,} | {c['bytes']:,} | {c['tokens']:,} | `{c['sha256'][:16]}…` |" for c in f["corpora"])
    text = f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [qwen2, tiny, test-model]
---

# qwen2-tiny

A {f['params'] / 1e6:.2f}M-parameter Qwen2 (`Qwen2ForCausalLM`) trained from scratch on about 2.6 MB of English
text, shipped inside `qwen2q` so that tests, examples and quantization runs have a real checkpoint without
downloading anything.  It loads like any Qwen2 checkpoint (transformers' `AutoModelForCausalLM` /
`AutoTokenizer`, or `qwen2q.loader.load_model`).  It is a toy: it strings together English-looking words and phrases and
nothing more.  Do not use it for anything but software testing.

## Architecture

| field | value |
| --- | --- |
| hidden size | {a['hidden_size']} |
| layers | {a['layers']} |
| attention heads / KV heads | {a['heads']} / {a['kv_heads']} (GQA), head dim {a['hidden_size'] // a['heads']}, q/k/v bias |
| MLP (SwiGLU) intermediate size | {a['intermediate_size']} |
| vocabulary | {a['vocab_size']} (byte-level BPE, Qwen2 pre-tokenizer) |
| context length | {a['seq_len']} (`max_position_embeddings`), RoPE theta {a['rope_theta']:g} |
| embeddings | tied (`lm_head` = `embed_tokens`) |
| parameters | {f['params']:,} |
| weights | bf16 safetensors, {f['weights_bytes'] / 2**20:.2f} MiB; the directory is {f['dir_bytes'] / 2**20:.2f} MiB |

Every linear layer has input and output sizes that are multiples of 128, so all quantized kernels apply.

Tokenizer: byte-level BPE trained with `tokenizers` in Qwen2's layout (NFC normalizer, Qwen2's split regex,
byte-level pre-tokenizer and decoder, all 256 bytes in the base alphabet so any text encodes and decodes
back exactly).  Special tokens: `<|endoftext|>` = {f['ids'][ENDOFTEXT]} (padding, document separator),
`<|im_start|>` = {f['ids'][IM_START]}, `<|im_end|>` = {f['ids'][IM_END]} (end of turn, `eos_token`).  The
chat template is Qwen2-Instruct's ChatML template (default system prompt "You are a helpful assistant.").
The model was never trained on chat-formatted text, so it does not follow instructions.

## Recipe

```
{f['command']}
```

run from the repository root, with the shared corpora in `../shared/data` (they are not in this
repository).  Seed {a['seed']}; {a['threads']} CPU threads; torch {f['torch']}.

* data: each corpus split into documents (WikiExtractor `<doc>` tags stripped; one document per line for
  C4-style files), each followed by `<|endoftext|>`, concatenated into one stream of {f['train_tokens']:,} tokens.
* {a['steps']} steps of {a['batch_size']} random windows x {a['seq_len']} tokens ({a['steps'] * a['batch_size'] * a['seq_len']:,} tokens,
  about {a['steps'] * a['batch_size'] * a['seq_len'] / f['train_tokens']:.1f} passes over the stream), windows drawn from a seeded generator.
* fp32 training, AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak learning rate {a['lr']:g},
  {a['warmup']} warmup steps then cosine to {a['lr'] * a['min_lr_ratio']:g}, gradient clipping {a['clip']};
  weights N(0, 0.02), residual output projections N(0, 0.02/sqrt(2 * layers)).
* saved in bf16.

Training time: {f['train_seconds'] / 60:.1f} minutes wall-clock for the model ({f['tokenizer_seconds']:.0f} s for the tokenizer)
on a 2-core CPU shared with other jobs, using {f['train_cpu_seconds'] / 60:.1f} CPU-minutes over its {a['threads']} threads, i.e. about
{f['train_cpu_seconds'] / 60 / a['threads']:.0f} minutes of the whole machine had it run alone.  Final training loss: {f['final_loss']:.3f} (last step),
{f['final_loss_mean50']:.3f} (mean of the last 50 steps), in nats per token.

## Perplexity

Measured on the saved bf16 weights, computed in fp32 by `qwen2q.evals.perplexity.perplexity`: the text is
tokenized once, cut into non-overlapping {a['seq_len']}-token windows (the partial last window dropped), and each
window scores its last {a['seq_len'] - 1} tokens.  The baseline is an add-one smoothed unigram model over the
training stream's tokens, scored on the same tokens (`unigram_perplexity`).  Perplexities are per token of
this tokenizer, so they compare only with models that share it.

{ppl_table}

Neither text is in the training data: WikiText-2 is not one of the corpora, and a check of the corpora for
any 13-word run of either evaluation text (WikiText's ` @-@ ` tokenization undone) found {f['overlap']['wikitext']} shared runs
with WikiText-2 test and {f['overlap']['pydoc']} with the pydoc topics.

## Training data and licences

| corpus | documents | bytes | tokens | sha256 |
| --- | ---: | ---: | ---: | --- |
{corpora}

The three files are unchanged copies of `exllamav2/conversion/standard_cal_data/{{wiki,c4,technical}}.utf8`
from the PyPI wheel `exllamav2==0.3.2` (MIT-licensed package):

* `wiki.utf8`: English Wikipedia articles (WikiExtractor output).  Wikipedia text is by Wikipedia's
  contributors under CC BY-SA (3.0 / 4.0); see each article's history at the `curid` URL in its `<doc>` tag.
* `c4.utf8`: web text in the style of C4 (Colossal Clean Crawled Corpus, Raffel et al. 2020), released by
  AllenAI under ODC-BY; the pages' own copyright rests with their authors.
* `technical.utf8`: technical prose: software licence texts (MIT, Apache-2.0) and encyclopedia-style
  science and computing articles, largely from Wikipedia (CC BY-SA).

Evaluation only (not trained on): WikiText-2 (Merity et al., *Pointer Sentinel Mixture Models*, 2016; CC BY-SA
3.0) and CPython's `pydoc_data.topics` (Python Software Foundation License).

The weights are distributed with `qwen2q` under its Apache-2.0 licence.  They hold no copy of the text, but
like any language model they may reproduce short fragments of it; attribute the sources above if you
redistribute outputs that do.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- main


def _check_shapes(options: dict) -> None:
    """Every linear's sizes must be multiples of 128, so that every quantized kernel applies."""
    for name in ("vocab_size", "hidden_size", "intermediate_size"):
        if options[name] % 128:
            raise click.BadParameter("must be a multiple of 128", param_hint=f"--{name.replace('_', '-')}")
    if (options["hidden_size"] // options["heads"] * options["kv_heads"]) % 128:
        raise click.UsageError("the k/v projection width (kv_heads * head_dim) must be a multiple of 128")


def _command_line(ctx: click.Context) -> str:
    """The command that reproduces this run: every option not left at its default, as given."""
    parts = []
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag)
        else:
            parts += [x for v in (value if param.multiple else [value]) for x in (flag, str(v))]
    return f"python dev {ctx.command.name} " + shlex.join(parts)


@click.command("train-tiny", help=__doc__)
@click.option("--corpus", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training text file (repeat).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (Hugging Face format).")
@click.option("--vocab-size", default=8192, show_default=True)
@click.option("--hidden-size", default=256, show_default=True)
@click.option("--intermediate-size", default=768, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--kv-heads", default=2, show_default=True)
@click.option("--context-len", "seq_len", default=512, show_default=True,
              help="Training window = the model's context (max_position_embeddings).")
@click.option("--rope-theta", default=10000.0, show_default=True)
@click.option("--steps", default=600, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--min-lr-ratio", default=0.1, show_default=True)
@click.option("--warmup", default=30, show_default=True)
@click.option("--weight-decay", default=0.1, show_default=True)
@click.option("--clip", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the weights and of the batches.")
@click.option("--threads", default=2, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--wikitext", type=click.Path(path_type=Path), default=None,
              help="wiki.test.raw (default: <data dir>/wikitext-2-raw/wiki.test.raw).")
@click.option("--no-eval", is_flag=True, help="Skip the perplexity evaluation (the card then has none).")
@click.option("--time-steps", default=0, help="Only time this many training steps; write nothing.")
@click.pass_context
def command(ctx, **options) -> None:
    _check_shapes(options)
    train_and_save(types.SimpleNamespace(**options), _command_line(ctx))


def main(argv: list[str] | None = None) -> int:
    """`python dev train-tiny ARGV` in this process (see `qwen2q_dev.cli.main`)."""
    from qwen2q_dev.cli import run_command

    return run_command(command, argv)


def train_and_save(args: types.SimpleNamespace, command: str) -> None:
    """Train the tokenizer and the model as `args` say, save them into args.out with the model card."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"$ {command}")

    # Data
    corpora, docs = [], []
    for path in args.corpus:
        d = read_documents(path)
        corpora.append({"path": path.name, "documents": len(d), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        docs.append(d)
        log(f"{path}: {len(d)} documents, {path.stat().st_size:,} bytes")
    all_docs = [x for d in docs for x in d]

    # Tokenizer
    t0 = time.perf_counter()
    tok = train_tokenizer(all_docs, args.vocab_size)
    tokenizer_seconds = time.perf_counter() - t0
    eot = tok.token_to_id(ENDOFTEXT)
    pieces = []
    for c, d in zip(corpora, docs):
        enc = tok.encode_batch(d)
        ids = [i for e in enc for i in (*e.ids, eot)]
        c["tokens"] = len(ids)
        pieces.append(torch.tensor(ids, dtype=torch.long))
    stream = torch.cat(pieces)
    log(f"tokenizer: {args.vocab_size} entries in {tokenizer_seconds:.1f}s; training stream {stream.numel():,} tokens "
        f"({sum(c['bytes'] for c in corpora) / stream.numel():.2f} bytes/token)")

    # Model
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg_dict = model_config(args, ids)
    model = Qwen2ForCausalLM(Qwen2Config.from_dict(cfg_dict))
    init_weights(model, args.layers)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    log(f"model: {params:,} parameters")

    if args.time_steps:
        args.steps = args.time_steps
        args.log_every = 1
        r = train(model, stream, args)
        log(f"timed {args.time_steps} steps: {r['seconds']:.1f}s, {r['seconds'] / args.time_steps:.2f} s/step")
        return

    r = train(model, stream, args)
    log(f"trained {args.steps} steps in {r['seconds'] / 60:.1f} min ({r['cpu_seconds'] / 60:.1f} CPU-min); final loss {r['final_loss']:.4f} "
        f"(mean of last 50: {r['final_loss_mean50']:.4f})")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, dtype=torch.bfloat16)
    (out / "config.json").write_text(json.dumps({**cfg_dict, "dtype": "bfloat16"}, indent=2) + "\n")
    write_tokenizer_files(tok, out, args.seq_len)
    log(f"saved {out}; model.safetensors sha256 {sha256_file(out / 'model.safetensors')}")

    facts = {
        "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path) and k != "corpus"},
        "command": command,
        "corpora": corpora,
        "params": params,
        "ids": ids,
        "train_tokens": stream.numel(),
        "tokenizer_seconds": tokenizer_seconds,
        "train_seconds": r["seconds"],
        "train_cpu_seconds": r["cpu_seconds"],
        "final_loss": r["final_loss"],
        "final_loss_mean50": r["final_loss_mean50"],
        "torch": torch.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }

    if not args.no_eval:
        t0 = time.perf_counter()
        from tokenizers import Tokenizer

        saved_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        saved = load_model(out, dtype=torch.float32)
        counts = torch.bincount(stream, minlength=args.vocab_size)
        texts = {}
        wikitext = args.wikitext
        if wikitext is None and find_data_dir() is not None:
            wikitext = find_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
        if wikitext is not None and wikitext.is_file():
            texts["wikitext"] = wikitext.read_text(encoding="utf-8")
        else:
            log("WikiText-2 test file not found; its perplexity is left out of the card")
        texts["pydoc"] = pydoc_topics_text()
        corpus_grams = set().union(*(word_ngrams(x, 13) for x in all_docs))
        facts["overlap"] = {"wikitext": "n/a", "pydoc": "n/a"}
        for name, text in texts.items():
            plain = wikitext_plain(text) if name == "wikitext" else text
            facts["overlap"][name] = len(word_ngrams(plain, 13) & corpus_grams)
            eval_ids = torch.tensor(saved_tok.encode(text).ids, dtype=torch.long)
            m = perplexity(saved, eval_ids, args.seq_len)
            u = unigram_perplexity(counts, eval_ids, seq_len=args.seq_len)
            facts[name] = {"model": m, "unigram": u}
            log(f"{name}: ppl {m['ppl']:.2f} (nll {m['nll']:.4f}) vs unigram {u['ppl']:.1f}; "
                f"{m['windows']} windows x {args.seq_len - 1} = {m['tokens']:,} scored tokens; "
                f"13-gram overlap with the corpora: {facts['overlap'][name]}")
        log(f"evaluation: {time.perf_counter() - t0:.0f}s")
    else:
        facts["overlap"] = {"wikitext": "n/a", "pydoc": "n/a"}

    facts["weights_bytes"] = (out / "model.safetensors").stat().st_size
    facts["dir_bytes"] = 0
    write_card(out, facts)
    facts["dir_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    write_card(out, facts)  # again, now that the card's own size is counted (its length barely changes)
    log(f"wrote {out}: {facts['dir_bytes'] / 2**20:.2f} MiB")
