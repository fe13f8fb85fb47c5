"""Ray reads these at import, so they are set before test_ray.py imports it: the local Ray instance
runs in single-node mode (every address it and the services use is 127.0.0.1) and sends no usage
statistics."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
