"""Packaging detail pyproject.toml cannot express: the top-level ``bundles/`` folder ships inside the package
as ``regnet_zoo/bundles/`` (``regnet_zoo.bundle_dir`` finds it there after a non-editable install)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["regnet_zoo*"]), "regnet_zoo.bundles"],
    package_dir={"regnet_zoo.bundles": "bundles"},
)
