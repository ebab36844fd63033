"""dev/benchmark_training.py: its measurements against a model whose time, memory and
synchronisations are known, and the script on the quick-start model (and, with a release
checkout, against the release)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from tests.tooling import QUICK, ROOT

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

SCRIPT = os.path.join(ROOT, "dev", "benchmark_training.py")
MIB = 2**20


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Matcher(nn.Module):
    def forward(self, value):
        time.sleep(0.2)
        return value


class Criterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.matcher = Matcher()

    def forward(self, value):
        self.matcher(value)
        time.sleep(0.05)
        return {"loss": value.square().sum()}


class KnownModel(nn.Module):
    """0.1 s of its own forward, a 16 MiB temporary, 3 reads of a device value."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.criterion = Criterion()

    def forward(self, batch):
        time.sleep(0.1)
        temporary = torch.ones(4 * MIB)  # float32: 16 MiB, freed before the step ends
        value = self.weight * temporary[:4]
        for _ in range(3):
            value.sum().item()
        del temporary
        return self.criterion(value)


class Trainer:
    """Forward, backward, optimizer step: the shape of detectron2's SimpleTrainer."""

    def __init__(self, model, data, optimizer):
        self.model, self.optimizer = model, optimizer

    def run_step(self):
        self.optimizer.zero_grad()
        sum(self.model(None).values()).backward()
        self.optimizer.step()


class SlowSGD(torch.optim.SGD):
    def step(self, closure=None):
        time.sleep(0.15)
        return super().step(closure)


def test_parts_memory_and_synchronisations_of_a_known_step():
    script = load_script()
    model = KnownModel()
    trainer = Trainer(model, None, SlowSGD(model.parameters(), lr=0.1))
    trainer.iter = 0
    side = script.Side("known", model, trainer, ("forward",))
    for _ in range(3):
        side.step()
    median = side.summary()["median_s"]
    assert 0.1 <= median["forward"] < 0.2
    assert 0.2 <= median["matcher"] < 0.3
    assert 0.05 <= median["losses"] < 0.15
    assert 0.15 <= median["optimizer"] < 0.25
    assert 0.5 <= median["step"] < 0.8
    for record in side.records:  # the parts divide the step
        assert min(record[part] for part in script.PARTS) >= 0
        assert sum(record[part] for part in script.PARTS) == pytest.approx(record["step"], abs=1e-6)
    assert side.syncs().total == 3
    assert 16 <= side.peak_memory_mib() < 16.5
    assert model.weight.grad is not None and not torch.equal(model.weight.detach(), torch.ones(4))


def test_the_script_on_the_quick_start_model(tmp_path):
    output = tmp_path / "training.json"
    command = [sys.executable, SCRIPT, "--config-file", QUICK, "--batch", "1", "--input-size", "64x64"]
    command += ["--objects", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(output)]
    command += ["MODEL.DI_MASKDINO.DEC_LAYERS", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "synchronisations" in result.stdout and "peak memory of a step" in result.stdout
    (ours,) = json.loads(output.read_text())["results"]
    assert ours["name"] == "ours" and len(ours["steps"]) == 1
    assert all(ours["median_s"][part] > 0 for part in ("forward", "matcher", "losses", "optimizer"))
    assert ours["peak_memory_mib"] > 0
    # the training step's two: the matching costs, the loss terms for the check and the log
    assert ours["syncs"]["total"] == 2, ours["syncs"]


def test_wrong_arguments_are_named(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, SCRIPT, *a], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    assert "give either --config-file" in run().stderr
    assert "--release-source needs --release-config" in run("--release-source", str(tmp_path)).stderr
    assert "--input-size must be HxW" in run("--config-file", QUICK, "--input-size", "64").stderr


@pytest.mark.slow
def test_against_the_release():
    source = os.environ.get("DIMASKDINO_RELEASE_SOURCE")
    if not source:
        pytest.skip("set DIMASKDINO_RELEASE_SOURCE to a checkout of the DI-MaskDINO release to benchmark against it")
    command = [sys.executable, SCRIPT, "--release-source", source]
    command += ["--release-config", "configs/dimaskdino_r50_4scale_bs16_12ep.yaml", "--small", "--batch", "1"]
    command += ["--input-size", "128x128", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-memory"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("synchronisations"))
    ours, release = (int(v) for v in line.split()[1:])
    assert ours == 2 and release > ours


def test_compile_layers_compiles_each_layer_of_the_encoder_token_interaction_and_decoder():
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "quick_start.yaml"), ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = build_model(cfg)
    names = dict(model.named_parameters())
    expected = {
        f"{owner}.{index}"
        for owner in ("encoder.layers", "head.decoder.layers", "head.de_imbalance.stages.0.layers")
        for index in range(len(model.get_submodule(owner)))
    }
    assert load_script().compile_layers(model) == len(expected)
    compiled = {name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == expected
    assert dict(model.named_parameters()).keys() == names.keys()
