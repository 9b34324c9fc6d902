"""Suite-wide fixtures and settings. The NAT lab's fixtures live in tests/labfixtures.py."""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.labfixtures"]

# No per-example deadline: the machine is shared, and speed is measured in bench/, not here.
# In CI the examples are derived from each test's name (derandomize), so a run can be repeated
# exactly; on a developer's machine they stay random, to keep finding new cases.
settings.register_profile(
    "branchpbx",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("branchpbx")
