"""The MoCo v2 algorithm: model and queue, keys, one optimizer step, multi-process helpers."""
