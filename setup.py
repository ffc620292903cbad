"""Maps the import package `nxdt` onto the folder core/ (pyproject.toml holds everything else)."""

from setuptools import find_namespace_packages, setup

setup(
    package_dir={"nxdt": "core"},
    # Namespace packages too: the embedded data folders are shipped as package data, and setuptools
    # deprecates data in folders that are importable but not listed as packages.
    packages=["nxdt"] + [f"nxdt.{name}" for name in find_namespace_packages("core", exclude=["*__pycache__*"])],
)
