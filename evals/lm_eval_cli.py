"""`lm_eval` with the `qwen2q` model registered (lm-eval finds no model outside its own package by itself):

    python -m qwen2q.evals.lm_eval_cli --model qwen2q --model_args pretrained=DIR,device=cpu --tasks TASKS ...

Every other argument is lm_eval's own (`lm_eval --help`).  See `qwen2q.evals.lm_eval_model`.
"""


def main() -> None:
    import qwen2q.evals.lm_eval_model  # noqa: F401  (registers the model "qwen2q")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
