"""train.compile: compiled steps equal eager ones, a failing compiler falls back to eager with one
line and no state change, and checkpoints do not depend on it.

torch.compile's default backend (inductor) writes and builds C++ kernels: about a minute for the
smallest ResNet on this project's 2-core CPU, too slow for a unit test. These tests compile with
"aot_eager", which runs the same capture (dynamo, AOTAutograd's forward and backward graphs) and
executes the graphs with PyTorch's own kernels; `python -m benchmarks compile` runs inductor.
"""

import copy
import warnings

import pytest
import torch
import yaml
from accelerate import Accelerator
from torch._dynamo.backends.common import aot_autograd

from lowmem_moco import compiled
from lowmem_moco.checkpoint import list_checkpoints, read_checkpoint
from lowmem_moco.compiled import CompileFallback, compile_encoders, compile_module, is_compiled
from lowmem_moco.config import load_config
from lowmem_moco.errors import ConfigError
from lowmem_moco.factory import build_model, build_step
from lowmem_moco.trainer import Trainer
from support import missing

TINY = ["model.arch=test_resnet", "data.image_size=32", "model.dim=16", "moco.queue_size=64", "moco.key_chunks=4",
        "moco.momentum=0.9", "train.batch_size=16", "train.micro_batch_size=8"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from an empty cache (dynamo keeps compiled code per Python function)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")


def no_compiler(graph, example_inputs):
    raise RuntimeError("no working C++ compiler")


def steps(*overrides, count=3):
    """Losses of `count` steps from the same seed and images, and the model after them."""
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    moco = build_model(cfg, torch.device("cpu"))
    step = build_step(cfg, moco, Accelerator(cpu=True))
    shuffle, images = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses = []
    for _ in range(count):
        view_q, view_k = (torch.randn(16, 3, 32, 32, generator=images) for _ in range(2))  # 16x3x32x32 each
        losses.append(step(view_q, view_k, cfg.moco.momentum, shuffle).loss)
    return losses, moco


def test_compiled_steps_give_the_eager_losses_and_weights(aot_eager, one_cpu_thread):
    eager_losses, eager = steps()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="train.compile")  # a fallback would hide a broken compile
        compiled_losses, model = steps("train.compile=true")
    assert is_compiled(model.encoder_q.backbone) and is_compiled(model.encoder_k.backbone)
    # f_q at the micro-batch (with autograd) and f_k at the key chunk (without): two graphs, each once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    reference = eager.state_dict()
    assert list(model.state_dict()) == list(reference)  # the same checkpoint keys
    for name, value in model.state_dict().items():  # weights, BatchNorm statistics, queue
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", [no_compiler, aot_autograd(fw_compiler=lambda graph, _: graph,
                                                               bw_compiler=no_compiler)],
                         ids=["compiler fails", "backward compiler fails"])
def test_a_failing_compiler_falls_back_to_eager_with_one_line_and_nothing_run_twice(backend, monkeypatch,
                                                                                     one_cpu_thread):
    eager_losses, eager = steps(count=2)
    monkeypatch.setattr(compiled, "BACKEND", backend)
    with pytest.warns(UserWarning) as caught:
        losses, model = steps("train.compile=true", count=2)
    notes = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert len(notes) == 1  # one line, not one per step or per encoder
    assert missing(notes[0], "RuntimeError: no working C++ compiler", "eagerly", "train.compile=false") == []
    # Bit for bit the eager run: no BatchNorm statistics updated, momentum step or enqueue done twice.
    assert losses == eager_losses
    for name, value in model.state_dict().items():
        assert torch.equal(value, eager.state_dict()[name]), name


def test_compiling_in_place_keeps_parameters_keys_and_copies_apart():
    cfg = load_config(None, TINY)
    moco = build_model(cfg, torch.device("cpu"))
    keys, q_params, k_params = list(moco.state_dict()), list(moco.encoder_q.parameters()), list(moco.encoder_k.parameters())
    compile_encoders(moco, backend="eager")
    assert list(moco.state_dict()) == keys
    # The momentum update walks the same tensors as before (theta_k <- m theta_k + (1 - m) theta_q).
    assert all(a is b for a, b in zip(moco.encoder_q.parameters(), q_params))
    assert all(a is b for a, b in zip(moco.encoder_k.parameters(), k_params))
    twin = copy.deepcopy(moco.encoder_q.backbone)
    assert is_compiled(twin) and twin.forward.eager.__self__ is twin  # a copy runs its own weights
    assert twin.forward.compiled is not moco.encoder_q.backbone.forward.compiled


def test_modules_in_eval_mode_run_eagerly_without_compiling():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fallback = CompileFallback()
    compile_module(backbone, fallback, backend=no_compiler)
    images = torch.randn(4, 3, 8, 8)  # 4x3x8x8
    with torch.no_grad():
        backbone.eval()(images)  # the kNN monitor's pass: nothing compiled, so nothing failed
        assert fallback.reason is None
        with pytest.warns(UserWarning, match="train.compile: compiling failed"):
            backbone.train()(images)
    assert fallback.reason == "RuntimeError: no working C++ compiler"


def test_train_compile_is_a_checked_boolean():
    assert load_config().train.compile is False
    assert load_config(None, ["train.compile=yes"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile must be bool, got 'sometimes'"):
        load_config(None, ["train.compile=sometimes"])


@pytest.mark.slow  # three short training runs: 4 s; test_compiled_steps_... checks the keys quickly
def test_a_compiled_run_resumes_eagerly_from_the_same_checkpoint_keys(tmp_path, aot_eager, one_cpu_thread):
    run = [*TINY, "data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "train.epochs=1",
           "train.checkpoint_every=2", "train.log_every=1", "eval.knn_every=0"]
    Trainer(load_config(None, [*run, f"output_dir={tmp_path / 'eager'}", "train.max_steps=2"])).fit()
    trainer = Trainer(load_config(None, [*run, f"output_dir={tmp_path / 'compiled'}", "train.max_steps=2",
                                         "train.compile=true"]))
    assert is_compiled(trainer.moco.encoder_q.backbone) and is_compiled(trainer.moco.encoder_k.backbone)
    trainer.fit()
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["train"]["compile"] is True
    (eager, _), (saved, meta) = (read_checkpoint(list_checkpoints(tmp_path / d)[-1]) for d in ("eager", "compiled"))
    assert saved.keys() == eager.keys() and meta["step"] == 2
    for name in eager:
        torch.testing.assert_close(saved[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    resumed = Trainer(load_config(None, [*run, f"output_dir={tmp_path / 'compiled'}"]))
    assert resumed.step == 2 and not is_compiled(resumed.moco.encoder_q.backbone)
    assert resumed.fit()["step"] == 4
