"""Research scripts, run from the repository as modules: python -m tools.planted, tools.compare,
tools.bench, tools.bench_dp, tools.gpu_check."""
