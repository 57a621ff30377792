"""Developer tools: build the embedded model, write large random checkpoints, benchmark the kernels."""
