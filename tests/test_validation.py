"""The start-up checks of validation.py: the number of processes and the device's precision."""

import warnings

import pytest

from lowmem_moco.config import load_config, resolve_precision, validate_for_processes
from lowmem_moco.errors import ConfigError


def config(*overrides):
    return load_config(None, ["train.batch_size=32", "moco.queue_size=64", *overrides])


def test_the_batch_must_split_into_processes_times_micro_batches():
    validate_for_processes(config("train.micro_batch_size=16"), 2)  # 2 x 16 = 32
    with pytest.raises(ConfigError, match=r"^train.batch_size \(32\) must split into 4 processes x micro-batches "
                                          r"of 16; change train.micro_batch_size$"):
        validate_for_processes(config("train.micro_batch_size=16"), 4)


def test_key_chunks_count_chunks_of_each_process_share():
    validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=8"), 1)  # 32 keys, chunks of 4
    validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=4"), 2)  # 16 keys each, chunks of 4
    with pytest.raises(ConfigError, match=r"^moco.key_chunks \(16\) counts chunks per process and must split each "
                                          r"process's 16 keys into equal chunks of at least 2; e.g. moco.key_chunks=2$"):
        validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=16"), 2)
    with pytest.raises(ConfigError, match=r"process's 8 keys into equal chunks"):
        validate_for_processes(config("train.micro_batch_size=8", "moco.key_chunks=8"), 4)


def test_bf16_is_refused_below_compute_capability_8():
    with pytest.raises(ConfigError, match=r"^train.precision=bf16 is emulated \(slow\) on Tesla T4 \(compute "
                                          r"capability 7.5 < 8.0\); use train.precision=fp16$"):
        resolve_precision("bf16", (7, 5), "Tesla T4")
    assert resolve_precision("bf16", (8, 0), "A100") == "bf16"
    assert resolve_precision("bf16", None) == "bf16"  # a CPU: bf16 autocast
    assert resolve_precision("fp16", (7, 5), "Tesla T4") == "fp16"


def test_fp16_without_a_gpu_runs_in_fp32_with_a_warning():
    with pytest.warns(UserWarning, match=r"train.precision=fp16 needs a CUDA GPU .* running in fp32"):
        assert resolve_precision("fp16", None) == "no"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("no", None) == "no"
