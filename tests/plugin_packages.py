"""Throwaway plugin distributions for the plugin tests: a pyproject.toml, a package, an entry point."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_plugin(root: Path, dist: str, module: str, entry: str, body: str, version: str = "0.3.1") -> Path:
    """Write ``dist`` (package ``module``, entry point ``entry`` -> ``module.plugin``, plugin source ``body``) under ``root``."""
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "{version}"

            [project.entry-points."nxdt.plugins"]
            {entry} = "{module}.plugin"

            [tool.setuptools]
            packages = ["{module}"]
            """
        )
    )
    (pkg / module / "__init__.py").write_text("")
    (pkg / module / "plugin.py").write_text(textwrap.dedent(body))
    return pkg
