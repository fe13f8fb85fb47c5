"""Ray reads these at import, so they are set before test_ray.py imports it: the local Ray instance
runs in single-node mode (every address it and the services use is 127.0.0.1) and sends no usage
statistics. The chart fixtures every chart test file shares."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from tests.deploy.test_chart import CHART, VALUE_SETS, Release, render  # noqa: E402


@pytest.fixture(scope="module")
def chart():
    """The chart, loaded by the real Helm engine (helm_python)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def release(request, chart) -> Release:
    """The chart rendered with each value set of ``VALUE_SETS``."""
    return render(chart, VALUE_SETS[request.param])
