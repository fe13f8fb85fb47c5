"""What the expert-path tests share: the checkpoint they run (32 experts, top-6, MoE layers 1 and 2, hidden 64)."""
import pytest

from epserve.services.model.config import ModelConfig

MODEL = "groups_yarn"


@pytest.fixture(scope="module")
def path(hf_checkpoints):
    return hf_checkpoints[MODEL]


@pytest.fixture(scope="module")
def config(path):
    return ModelConfig.from_hf(path)
