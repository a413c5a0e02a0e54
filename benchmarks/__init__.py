"""Memory and throughput suite of lowmem-moco, against the naive MoCo v2 loop and timm's
supervised step. `python -m benchmarks --help`; what each figure means: benchmarks/README.md."""
