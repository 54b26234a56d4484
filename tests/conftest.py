import os

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
