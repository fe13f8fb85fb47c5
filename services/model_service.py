"""What attention replicas and expert shards share on top of ``lifecycle``: device, dtype, placement."""
from __future__ import annotations

import torch

from epserve.services.cluster.placement import Placement
from epserve.services.cluster.state import choose_placement
from epserve.services.config import ModelServiceConfig
from epserve.services.lifecycle import Service


def default_device(device: str | None) -> str:
    """``device``, or where a service runs when none is given: the GPU if there is one."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def device_and_dtype(config: ModelServiceConfig) -> tuple[str, torch.dtype]:
    device = default_device(config.device)
    if config.dtype:
        return device, getattr(torch, config.dtype)
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def service_placement(config: ModelServiceConfig, service: Service) -> Placement:
    """The placement every attention replica and expert shard of the cluster serves (from Redis)."""
    return choose_placement(service.client, service.keys, num_experts=service.model.n_routed_experts,
                            num_shards=config.expert_shards, redundant=config.redundant_experts,
                            moe_layers=service.model.moe_layers, profile_path=config.load_profile)
