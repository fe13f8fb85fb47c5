"""Attention/prefill service: everything but the routed experts, which it reaches over the expert transport."""
