"""What the benchmark commands share: cells and their measurement, the suite over a grid, the
naive baseline, the real CUDA step, the targets, the input measurements, the benchmark images,
and the one writer of results (results.py)."""
