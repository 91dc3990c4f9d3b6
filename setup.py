"""Installs both packages from one place: ``kne`` (from python/kne) and ``kne_kernels``."""

from setuptools import setup

setup(
    packages=["kne", "kne.baselines", "kne_kernels"],
    package_dir={"kne": "python/kne", "kne_kernels": "kne_kernels"},
)
