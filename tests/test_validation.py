"""The start-up checks of validation.py: the number of processes and the device's precision."""

import warnings

import pytest

from lowmem_moco.config import load_config, resolve_precision, validate_for_processes
from lowmem_moco.errors import ConfigError
from support import missing, raises_naming


def config(*overrides):
    return load_config(None, ["train.batch_size=32", "moco.queue_size=64", *overrides])


def test_the_batch_must_split_into_processes_times_micro_batches():
    validate_for_processes(config("train.micro_batch_size=16"), 2)  # 2 x 16 = 32
    with raises_naming(ConfigError, "train.batch_size (32)", "4 processes", "16", "train.micro_batch_size"):
        validate_for_processes(config("train.micro_batch_size=16"), 4)


def test_key_chunks_count_chunks_of_each_process_share():
    validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=8"), 1)  # 32 keys, chunks of 4
    validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=4"), 2)  # 16 keys each, chunks of 4
    with raises_naming(ConfigError, "moco.key_chunks (16)", "per process", "16 keys", "moco.key_chunks=2"):
        validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=16"), 2)
    with raises_naming(ConfigError, "moco.key_chunks (8)", "8 keys"):
        validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=8"), 4)


def test_bf16_is_refused_below_compute_capability_8():
    with raises_naming(ConfigError, "train.precision=bf16", "Tesla T4", "7.5", "train.precision=fp16"):
        resolve_precision("bf16", (7, 5), "Tesla T4")
    assert resolve_precision("bf16", (8, 0), "A100") == "bf16"
    assert resolve_precision("bf16", None) == "bf16"  # a CPU: bf16 autocast
    assert resolve_precision("fp16", (7, 5), "Tesla T4") == "fp16"


def test_fp16_without_a_gpu_runs_in_fp32_with_a_warning():
    with pytest.warns(UserWarning, match="train.precision=fp16") as caught:
        assert resolve_precision("fp16", None) == "no"
    assert missing(str(caught[0].message), "CUDA GPU", "fp32") == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("no", None) == "no"
