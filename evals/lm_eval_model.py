"""A `qwen2q` model for lm-evaluation-harness: any checkpoint qwen2q loads (bf16 or quantized), scored by lm-eval.

    python -m qwen2q.evals.lm_eval_cli --model qwen2q --model_args pretrained=DIR,device=cpu,dtype=bfloat16 \\
        --tasks TASKS [any other lm_eval option]

or, from Python, `import qwen2q.evals.lm_eval_model` (it registers the model) and then
`lm_eval.simple_evaluate(model="qwen2q", model_args="pretrained=DIR", tasks=[...])`.  Needs `lm_eval`
(>= 0.4.9; `pip install lm_eval`).

Requests are encoded exactly as lm-eval's own Hugging Face model (`hf`) encodes them (its `TemplateLM`:
trailing context spaces move to the continuation; an empty context is the prefix token, the BOS token if
the tokenizer has one, else EOS), windows are lm-eval's rolling windows over the model's context, and
log-probabilities are taken in fp32 from qwen2q's logits.  Batches are right-padded: the model is causal,
so a row's logits never see its padding.  Generation is greedy (`do_sample` false), up to `max_gen_toks`
(default 256) and cut at the first `until` string.  It applies no repetition penalty: for the `hf` model to
match, a task gives `repetition_penalty: 1.0` (transformers otherwise takes the checkpoint's
generation_config.json value, greedy or not).
"""
from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models: it loads them only into an empty registry)
import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import qwen2q

DEFAULT_MAX_GEN_TOKS = 256


@register_model("qwen2q")
class Qwen2qLM(TemplateLM):
    """lm-eval's interface over `qwen2q.load(pretrained, device, dtype)`; `batch_size` rows per forward."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", dtype: str = "bfloat16",
                 batch_size: int | str = 1, max_length: int | None = None, cpu_cache: str | None = None,
                 **kwargs):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's CLI passes cuda:0 unasked
            print(f"note: {device} is not available here; the qwen2q model runs on cpu", file=sys.stderr)
            device = "cpu"
        self.m = qwen2q.load(pretrained, device=device, dtype=dtype, cpu_cache=cpu_cache)
        self.tok = self.m.tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" is not supported: 1
        self._max_length = int(max_length) if max_length else self.m.config.max_position_embeddings
        self._device = next(self.m.model.parameters()).device

    # --- what TemplateLM needs -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.token_to_id(self.tok.eos_token)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.token_to_id(self.tok.bos_token) if self.tok.bos_token else None
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # Qwen2 tokenizers add no special tokens

    def _scores(self, batch: list[list[int]]) -> torch.Tensor:
        """Log-probabilities fp32 [B, T, V] of right-padded token rows."""
        T = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
        with torch.inference_mode():
            return F.log_softmax(self.m.model(ids.to(self._device)).float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context ids, continuation ids)] -> [(logprob, is_greedy)]."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # long rows first: less padding
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            scores = self._scores([rows[i][0] for i in chunk])
            for b, i in enumerate(chunk):
                inp, cont = rows[i]
                logp = scores[b, len(inp) - len(cont) : len(inp)]  # the positions that predict the continuation
                target = torch.tensor(cont)
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in [req.args for req in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            pairs = [(None, context, continuation) for context, continuation in windows]
            results.append(sum(logp for logp, _ in self._loglikelihood_tokens(pairs)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
                raise ValueError("the qwen2q lm-eval model decodes greedily; do_sample is not supported")
            if kwargs.get("repetition_penalty", 1.0) != 1.0:
                raise ValueError("the qwen2q lm-eval model has no repetition penalty; give repetition_penalty: 1.0")
            new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = self.tok_encode(context)[-(self.max_length - new):]
            ids = self.m.generate_ids(prompt, max_new_tokens=new, temperature=0.0)
            text = self.tok.decode(ids, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out
