"""`lowmem-moco plan --gpu auto`: the machine's CUDA device (replaced here) planned as a known
card, as an unknown card by its total memory, and the message without CUDA."""

from __future__ import annotations

import json

import pytest

from lowmem_moco.cli import main
from lowmem_moco.plan import device
from lowmem_moco.plan.device import CudaDevice, known_gpu
from lowmem_moco.plan.predict import GPUS, GiB

from test_plan import TINY

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def plan_on(monkeypatch, capsys, tmp_path, found: CudaDevice | None, *flags: str, precision: str = "fp16"):
    monkeypatch.setattr(device, "cuda_device", lambda: found)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train: {{precision: {precision}}}\n")
    code = main(["plan", str(recipe), *TINY, "--gpu", "auto", *flags])
    return code, capsys.readouterr()


def test_a_known_card_is_planned_as_that_card(monkeypatch, capsys, tmp_path):
    code, out = plan_on(monkeypatch, capsys, tmp_path, CudaDevice("Tesla T4", int(15.6e9), (7, 5)))
    assert code == 0
    lines = out.out.splitlines()
    assert lines[0] == f"found Tesla T4 ({15.6e9 / GiB:.2f} GiB): planning as t4"
    assert "precision fp16 (fp16 autocast with loss scaling: no native bf16)" in lines[1]
    assert "capacity  14.56 GiB (t4, assumed capacity)" in out.out
    code, out = plan_on(monkeypatch, capsys, tmp_path, CudaDevice("Tesla T4", int(15.6e9), (7, 5)), "--json")
    assert json.loads(out.out)["budget_bytes"] == int(GPUS["t4"].capacity_gib * GiB)


def test_an_unknown_card_is_planned_with_its_total_memory(monkeypatch, capsys, tmp_path):
    card = CudaDevice("NVIDIA RTX 4090", 24 * GiB, (8, 9))
    code, out = plan_on(monkeypatch, capsys, tmp_path, card)
    assert code == 0
    assert out.out.splitlines()[0] == ("found NVIDIA RTX 4090 (24.00 GiB): not a card the planner knows; "
                                       "planning with its total memory (compute capability 8.9)")
    assert "capacity  24.00 GiB (NVIDIA RTX 4090, its total memory)" in out.out
    code, out = plan_on(monkeypatch, capsys, tmp_path, card, "--json", precision="bf16")
    assert json.loads(out.out)["budget_bytes"] == 24 * GiB and json.loads(out.out)["precision"] == "bf16"
    # As training would: bf16 is refused before compute capability 8.0, naming the fix.
    code, out = plan_on(monkeypatch, capsys, tmp_path, CudaDevice("Quadro RTX 6000", 24 * GiB, (7, 5)), "--json",
                        precision="bf16")
    assert code == 2 and "train.precision=fp16" in out.err


def test_without_cuda_the_error_names_both_fixes(monkeypatch, capsys, tmp_path):
    code, out = plan_on(monkeypatch, capsys, tmp_path, None)
    assert code == 2
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
    assert "--gpu NAME" in err and "--budget-gb N" in err


@pytest.mark.parametrize("name, total_gib, key", [
    ("Tesla T4", 14.6, "t4"), ("NVIDIA L4", 22, "l4"), ("NVIDIA L40S", 44, None),
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40"), ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80"),
    ("NVIDIA A100 80GB PCIe", 79.2, "a100-80"), ("NVIDIA H100 80GB HBM3", 79.1, "h100"),
    ("NVIDIA H200", 139.8, None)])
def test_device_names_map_to_known_cards(name, total_gib, key):
    assert known_gpu(name, int(total_gib * GiB)) == key
