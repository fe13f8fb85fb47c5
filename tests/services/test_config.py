"""Service configs: the dataclasses hold the only defaults, flags come from them and parse back."""
import argparse
import dataclasses

import pytest

from epserve.services.cli import build_parser
from epserve.services.config import (SERVICE_CONFIGS, AttentionConfig, ExpertConfig, ModelServiceConfig, RouterConfig,
                                     UpConfig, kind_of, serve_command, service_id)
from epserve.services.engine.config import EngineConfig
from epserve.services.flags import add_flags, from_args, from_dict, settings, to_argv

pytestmark = pytest.mark.unit

NON_DEFAULT = {
    "router": RouterConfig(redis="redis://r:1/0", cluster="c", model="/m", host="0.0.0.0", port=7, advertise_host="10.0.0.1",
                           verbose=True, router_id="router-9", max_queue=3, max_request_bytes=99, max_concurrent_rpcs=5,
                           api_keys_file="/keys", tls_cert="/c.pem", tls_key="/k.pem"),
    "attention": AttentionConfig(redis="redis://r:1/0", replica_id="attention-3", device="cpu", dtype="bfloat16",
                                 expert_shards=4, redundant_experts=2, load_profile="/p.json", block_size=8,
                                 num_kv_blocks=5, max_num_seqs=6, max_num_batched_tokens=7, max_model_len=64,
                                 micro_batches=3, micro_batch_min_tokens=1, load_mtp=True, wire_dtype="fp8",
                                 shard_wait=1.5, drain_timeout=2.5),
    "expert": ExpertConfig(redis="redis://r:1/0", shard_id=3, expert_shards=4, flush_interval=0.25),
}


@pytest.mark.parametrize("kind", SERVICE_CONFIGS)
def test_every_setting_is_a_flag_and_to_argv_parses_back_to_the_config(kind):
    config = NON_DEFAULT[kind]
    command = serve_command(config)
    assert command[3:5] == ["serve", kind] and kind_of(config) == kind
    args = build_parser().parse_args(command[3:])
    assert from_args(SERVICE_CONFIGS[kind], args) == config


@pytest.mark.parametrize("kind", SERVICE_CONFIGS)
def test_defaults_are_the_dataclass_defaults_and_only_required_flags_are_emitted(kind):
    cls = SERVICE_CONFIGS[kind]
    required = {f.name: ("x" if f.type == "str" else 1) for f in settings(cls) if f.default is dataclasses.MISSING}
    config = cls(**required)
    assert len(to_argv(config)) == len(required)          # nothing at its default is spelled out
    parsed = from_args(cls, build_parser().parse_args(["serve", kind, *to_argv(config)]))
    assert parsed == config


def test_a_required_setting_is_a_required_flag(capsys):
    parser = argparse.ArgumentParser()
    add_flags(parser, ExpertConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--redis", "redis://x"])          # no --shard-id
    assert "required: --shard-id" in capsys.readouterr().err


def test_attention_engine_settings_are_the_engine_defaults():
    config = AttentionConfig(redis="redis://x", replica_id="a")
    assert config.engine() == EngineConfig()
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= {f.name for f in settings(AttentionConfig)}


def test_up_passes_its_shape_to_every_service():
    up = UpConfig(attention=2, expert_shards=3, redundant_experts=1, micro_batches=3, dtype="float32", port=9)
    logins = {kind: {"redis": f"redis://{kind}@h:1/0", "redis_password_file": f"/run/{kind}.password",
                     "cluster_cert": f"/run/{kind}.crt"} for kind in ("router", "attention", "expert")}
    services = up.services(logins, "up-x")
    assert [(kind_of(s), service_id(s)) for s in services] == [
        ("expert", "0"), ("expert", "1"), ("expert", "2"), ("attention", "attention-0"), ("attention", "attention-1"),
        ("router", "router-0")]
    assert all({name: getattr(s, name) for name in logins[kind_of(s)]} == logins[kind_of(s)] and s.cluster == "up-x"
               for s in services)
    model_services = [s for s in services if isinstance(s, ModelServiceConfig)]
    assert all((s.expert_shards, s.redundant_experts, s.dtype) == (3, 1, "float32") for s in model_services)
    assert {s.micro_batches for s in services if isinstance(s, AttentionConfig)} == {3}
    assert services[-1].port == 9


def test_up_defaults_follow_the_services():
    up = UpConfig()
    attention = next(s for s in up.services(dict.fromkeys(("router", "attention", "expert"), {"redis": "redis://x"}), "c") if isinstance(s, AttentionConfig))
    assert (attention.micro_batches, attention.micro_batch_min_tokens) == (
        EngineConfig().micro_batches, EngineConfig().micro_batch_min_tokens)
    assert "--micro-batches" not in " ".join(to_argv(attention))


def test_from_dict_refuses_unknown_and_launcher_set_names():
    assert from_dict(AttentionConfig, {"wire_dtype": "fp8"}, redis="r", replica_id="a").wire_dtype == "fp8"
    with pytest.raises(ValueError, match="no setting 'wire_dtyp'"):
        from_dict(AttentionConfig, {"wire_dtyp": "fp8"}, redis="r", replica_id="a")
    with pytest.raises(ValueError, match="replica_id is set by the launcher"):
        from_dict(AttentionConfig, {"replica_id": "b"}, redis="r", replica_id="a")


def test_bounds_and_choices_are_checked_with_the_flag_named(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "attention", "--redis", "r", "--replica-id", "a", "--micro-batches", "9"])
    assert "argument --micro-batches: must be in [1, 4], got 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--dtype", "float8"])
    assert "argument --dtype: must be one of float32, bfloat16, float16, got 'float8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num-kv-blocks: must be >= 1, got 0"):
        from_dict(AttentionConfig, {"num_kv_blocks": 0}, redis="r", replica_id="a")
    with pytest.raises(ValueError, match="must be int, got '3'"):
        from_dict(AttentionConfig, {"micro_batches": "3"}, redis="r", replica_id="a")


def test_a_shard_takes_its_own_capacity_from_one_number_or_a_list_by_shard_id():
    assert ExpertConfig(redis="r", shard_id=1, expert_shards=3).own_capacity() == 1.0
    assert ExpertConfig(redis="r", shard_id=1, expert_shards=3, capacity="0.5").own_capacity() == 0.5
    assert ExpertConfig(redis="r", shard_id=1, expert_shards=3, capacity="1,0.25,2").own_capacity() == 0.25
    for bad in ("fast", "1,2", "1,0,1", "-1"):
        with pytest.raises(ValueError, match="--capacity"):
            ExpertConfig(redis="r", shard_id=0, expert_shards=3, capacity=bad)
    shards = [c for c in UpConfig(expert_shards=2, capacity="1,0.5").services(
        {kind: {} for kind in ("router", "attention", "expert")}, "c") if isinstance(c, ExpertConfig)]
    assert [c.own_capacity() for c in shards] == [1.0, 0.5]
