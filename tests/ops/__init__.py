"""The kernel tests, one file per op (a package, so that its conftest.py and helpers do not shadow
the suite's own ``conftest`` module)."""
