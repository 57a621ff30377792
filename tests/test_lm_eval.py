"""The `qwen2q` lm-eval model scores like lm-eval's own Hugging Face model (`hf`) on the same checkpoint.

Offline: three small local tasks whose data files the test writes (multiple choice, rolling log-likelihood,
greedy generation), on the embedded model in bf16.  Both models take log-probabilities in fp32 (`hf` with
`softmax_dtype=float32`), so the only difference left is the logits: qwen2q's runtime and transformers'
compute in other orders, within bf16 rounding.  Hence: accuracies and generations equal, and the rolling
perplexities within 0.5%.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen2q.files import DEFAULT_MODEL

lm_eval = pytest.importorskip("lm_eval", minversion="0.4.9")
pytest.importorskip("transformers")
from lm_eval.tasks import TaskManager  # noqa: E402

import qwen2q.evals.lm_eval_model  # noqa: E402,F401  (registers "qwen2q")

QUESTIONS = [  # simple Python facts: the tiny model was trained on code and text like this
    ("The keyword that defines a function in Python is", ["def", "class", "lambda", "import"], 0),
    ("To leave a loop early, Python uses the statement", ["break", "continue", "pass", "return"], 0),
    ("The value of len([1, 2, 3]) is", ["3", "2", "1", "0"], 0),
    ("A Python list is written with", ["square brackets", "curly braces", "angle brackets", "quotes"], 0),
    ("The built-in that prints text is", ["print", "echo", "write", "say"], 0),
    ("Comments in Python start with", ["#", "//", "--", ";"], 0),
]
PASSAGES = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "import os\nfor name in sorted(os.listdir('.')):\n    print(name)\n",
]
PROMPTS = ["def fibonacci(n):\n", "class Stack:\n", "Python is a programming language that"]


def write_tasks(root):
    """Three task YAMLs and their JSONL data under `root`; the task names."""
    data = {
        "mc.jsonl": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "rolling.jsonl": [{"text": t} for t in PASSAGES],
        "gen.jsonl": [{"prompt": p, "target": ""} for p in PROMPTS],
    }
    for name, rows in data.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: train\n"
    (root / "q2q_mc.yaml").write_text(
        f"task: q2q_mc\n{common}dataset_kwargs:\n  data_files: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "q2q_rolling.yaml").write_text(
        f"task: q2q_rolling\n{common}dataset_kwargs:\n  data_files: {root / 'rolling.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (root / "q2q_gen.yaml").write_text(
        f"task: q2q_gen\n{common}dataset_kwargs:\n  data_files: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  do_sample: false\n  max_gen_toks: 24\n"
        "  repetition_penalty: 1.0\n"  # else transformers takes generation_config.json's 1.05, even greedy
        "metric_list:\n  - metric: exact_match\n")
    return ["q2q_mc", "q2q_rolling", "q2q_gen"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("tasks")
    tasks = write_tasks(root)
    manager = TaskManager(include_path=str(root), include_defaults=False)
    out = {}
    for model, args in (("qwen2q", f"pretrained={DEFAULT_MODEL},dtype=bfloat16,batch_size=4"),
                        ("hf", f"pretrained={DEFAULT_MODEL},dtype=bfloat16,device=cpu,batch_size=1,"
                               "softmax_dtype=float32")):
        out[model] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager,
                                             log_samples=True, random_seed=0, numpy_random_seed=0,
                                             torch_random_seed=0)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield mp
    mp.undo()


def test_multiple_choice_scores_equal_hf(results):
    ours, theirs = results["qwen2q"]["results"]["q2q_mc"], results["hf"]["results"]["q2q_mc"]
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]
    our_ll = [s["resps"] for s in results["qwen2q"]["samples"]["q2q_mc"]]
    their_ll = [s["resps"] for s in results["hf"]["samples"]["q2q_mc"]]
    for a, b in zip(our_ll, their_ll):  # per choice: (logprob, is_greedy)
        for (la, ga), (lb, gb) in zip((r[0] for r in a), (r[0] for r in b)):
            assert abs(float(la) - float(lb)) <= 0.02 * max(1.0, abs(float(lb))) and ga == gb


def test_rolling_perplexity_within_half_a_percent_of_hf(results):
    ours, theirs = results["qwen2q"]["results"]["q2q_rolling"], results["hf"]["results"]["q2q_rolling"]
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert abs(ours[metric] / theirs[metric] - 1) < 0.005, (metric, ours[metric], theirs[metric])


def test_greedy_generations_equal_hf(results):
    ours = [s["resps"][0][0] for s in results["qwen2q"]["samples"]["q2q_gen"]]
    theirs = [s["resps"][0][0] for s in results["hf"]["samples"]["q2q_gen"]]
    assert all(o.strip() for o in ours) and ours == theirs


def test_the_cli_module_runs_lm_eval_with_the_model_registered(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    write_tasks(root)
    run = subprocess.run([sys.executable, "-m", "qwen2q.evals.lm_eval_cli", "--model", "qwen2q", "--model_args",
                          f"pretrained={DEFAULT_MODEL}", "--tasks", "q2q_mc", "--include_path", str(root),
                          "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "q2q_mc" in run.stdout and "acc" in run.stdout
