import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_decoder_config():
    from src.models.decoder import DecoderConfig

    return DecoderConfig(preset="tiny", vocab_size=40, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2,
                         intermediate_size=96)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def base_export(workdir):
    """A random base LVLM with the shipped architecture, exported like configs/base.yaml does."""
    from src.lit.checkpoint_io import export_checkpoint
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM

    torch.manual_seed(0)
    base = VisorLVLM(VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True), DecoderConfig(preset="tiny"),
                     LayerPlan(6, all_self=True), pos_conv=False)
    return str(export_checkpoint(base, workdir / "base", {}))


@pytest.fixture
def cli_process(tmp_path):
    """run(*args, cwd=tmp_path, timeout=600): `python -m src.cli <args>` as a process of its own (the
    repository on PYTHONPATH) -> the finished subprocess.CompletedProcess, output captured; the test
    asserts the return code it expects. For what one process cannot show: ranks, signals, exits."""
    root = Path(__file__).resolve().parents[1]

    def run(*args, cwd=None, timeout=600):
        env = {**os.environ, "PYTHONPATH": str(root)}
        return subprocess.run([sys.executable, "-m", "src.cli", *map(str, args)], cwd=cwd or tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return run
