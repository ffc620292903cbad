"""Maps the import package `nxdt` onto the folder core/ (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

setup(
    package_dir={"nxdt": "core"},
    packages=["nxdt"] + [f"nxdt.{name}" for name in find_packages("core")],
)
