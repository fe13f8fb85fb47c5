"""Expert shard service: the routed experts of its physical slots, for every MoE layer."""
