"""lowmem-moco: memory-efficient MoCo v2 on one GPU."""

__version__ = "0.1.0"
