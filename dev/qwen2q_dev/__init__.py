"""qwen2q's research and developer tools: in the repository, never in the wheel.

    research/   compare_peers (qwen2q next to bitsandbytes, AutoAWQ, llm-compressor), paired (window-by-window
                statistics of two rows), peers/ (the peers' venvs and diagnostics), results/ (measured JSON)
    tools/      train_tiny (the embedded model), random_checkpoint (real shapes, random weights),
                bench_kernels (the Triton kernels against cuBLAS)

Run them as `python dev COMMAND` from a checkout (`python dev --help` lists them).  They use qwen2q's
public surface (`qwen2q.load`, `qwen2q.quantize`, `qwen2q.calibrate.pipeline.CalibrationSettings`, the
evaluation protocol of `qwen2q.evals`) and the shared options of `qwen2q.cli_options`.
"""
