"""The Ray Serve application (services/ray_app.py) and its ``serve run`` config file.

A local Ray instance (loopback only) runs the tiny model's cluster on the CPU as Serve deployments:
embedded Redis, two expert shards with redundant experts, one attention replica, the router. The
SDK generates through the router's port and must get the single-process engine's greedy tokens;
shutting Serve and Ray down must leave no process behind.
"""
import os
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from epserve_client import Client
from ray import serve
from ray.serve.config import ProxyLocation
from ray.serve.schema import ServeDeploySchema

from epserve.services.cluster.ports import free_port
from epserve.services.engine.engine import EngineConfig, LLMEngine
from epserve.services.engine.params import SamplingParams
from epserve.services.model.tiny import tiny_model_path
from epserve.services.ray_app import Attention, ClusterArgs, ExpertShard, Router, build_app

# The thread timeout, not SIGALRM: once, a shard under Ray Serve died of SIGALRM (status -14) at start-up
# during the whole suite; whatever sent it, no timer signal is armed while Ray runs here.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300, method="thread")]

CONFIG_FILE = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve_config.yaml"
PROMPTS = [[5, 6, 7], [2, 40, 99, 101, 7, 8, 9, 250, 3]]
MAX_TOKENS = 8


def test_config_file_is_a_serve_config_with_a_gpu_per_shard_and_attention_replica():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG_FILE.read_text()))
    assert config.proxy_location == ProxyLocation.Disabled
    (app,) = config.applications
    assert app.import_path == "epserve.services.ray_app:build_app"
    args = ClusterArgs.model_validate(app.args)
    assert args.expert_shards == 8 and args.redundant_experts > 0 and args.redis_url
    attention = args.config("attention", redis=args.redis_url, service_id="attention-0")
    assert attention.wire_dtype == "fp8" and attention.expert_shards == 8 and attention.model == args.model
    options = {d.name: d.ray_actor_options for d in app.deployments}
    assert options["ExpertShard"].num_gpus == 1 and options["Attention"].num_gpus == 1
    assert options["Router"].num_gpus == 0
    assert set(options) == {d.name for d in (ExpertShard, Attention, Router)}


@pytest.fixture
def local_ray():
    """A Ray instance on loopback, as small as the CI machine; yields the processes that were here before it."""
    before = _descendants(os.getpid())
    env = {"EPSERVE_CACHE": os.environ["EPSERVE_CACHE"], "OMP_NUM_THREADS": "1"}
    options = dict(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20,
                   runtime_env={"env_vars": env}, logging_level="WARNING")
    for attempt in range(3):      # Ray gives its raylet a fixed 30 s to register: a loaded 2-core machine
        try:                      # has missed that twice in a row (once in a fresh CI run)
            ray.init(**options)
            break
        except Exception as err:  # noqa: BLE001
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()
            time.sleep(5)
    try:
        yield before
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def test_serve_app_generates_the_engine_tokens_through_the_sdk_and_leaves_no_process(local_ray):
    model = tiny_model_path()
    serve.start(proxy_location="Disabled")
    args = ClusterArgs(model=str(model), cluster="ray-test", expert_shards=2, redundant_experts=2,
                       router_port=free_port(), dtype="float32", startup_timeout_s=120,
                       attention={"micro_batch_min_tokens": 1})
    endpoint = serve.run(build_app(args), name="epserve", route_prefix=None).endpoint.remote().result()
    assert endpoint == f"127.0.0.1:{args.router_port}"

    with Client(endpoint, timeout=120) as client:
        got = [client.generate(p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).token_ids for p in PROMPTS]
    engine = LLMEngine.from_path(model, EngineConfig(block_size=16, num_kv_blocks=64), dtype=torch.float32)
    expected = [s.output_ids for s in engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                              ignore_eos=True))]
    assert got == expected

    spawned = _descendants(os.getpid()) - local_ray
    services = [p for p in spawned if b"epserve.services.cli\x00serve" in _cmdline(p)]
    assert len(services) == 4                        # 2 expert shards, attention, router
    assert sum(b"\x00--micro-batch-min-tokens=1" in _cmdline(p) for p in services) == 1   # `attention:` reached it
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in spawned if _alive(p)] == []


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait() is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
