"""The router (and the ``epserve`` command line) run without torch: they validate sampling fields and
tokenize with the torch-free halves of the engine, and read the model's config without building it."""
import json
import subprocess
import sys

import pytest

from epserve.services.model.catalog import checkpoint_dir, model_config, tiny_dir

pytestmark = pytest.mark.unit

ROUTER_MODULES = ["epserve.services.router", "epserve.services.router.main", "epserve.services.router.service",
                  "epserve.services.router.validation", "epserve.services.router.admission",
                  "epserve.services.router.replica_session", "epserve.services.router.auth", "epserve.services.cli"]


def test_router_modules_import_no_torch_in_a_fresh_interpreter():
    script = ("import importlib, json, sys\n"
              f"for name in {ROUTER_MODULES!r}: importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_tiny_is_known_without_building_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EPSERVE_CACHE", str(tmp_path))
    config = model_config("tiny")
    assert checkpoint_dir("tiny") is None                      # no tokenizer.json: the byte tokenizer
    assert config.vocab_size == 512 and config.n_routed_experts == 32
    assert not tiny_dir().exists()                             # nothing was written


def test_the_builtin_config_is_the_one_the_built_checkpoint_has():
    from epserve.services.model.config import ModelConfig
    from epserve.services.model.tiny import tiny_model_path

    assert model_config("tiny") == ModelConfig.from_hf(tiny_model_path())


def test_an_unknown_model_names_the_flag():
    with pytest.raises(FileNotFoundError, match="--model"):
        model_config("/no/such/checkpoint")
