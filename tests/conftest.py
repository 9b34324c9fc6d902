"""Suite-wide fixtures. The NAT lab's fixtures live in tests/labfixtures.py."""

pytest_plugins = ["tests.labfixtures"]
