"""Packaging layout (metadata, dependencies and tools are in pyproject.toml).

The top-level ``callbacks/`` and ``configs/`` folders stay where the design card puts them and ship
inside the package: ``callbacks/`` as ``lorkd.callbacks``, ``configs/`` as data under ``lorkd/configs``
(``lorkd.utils.CONFIG_DIR`` finds either copy).
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["lorkd", "lorkd.*"], exclude=["lorkd.callbacks", "*__pycache__*"]),
        "lorkd.callbacks",
        "lorkd.configs",
    ],
    package_dir={"lorkd.callbacks": "callbacks", "lorkd.configs": "configs"},
    package_data={"lorkd.configs": ["**/*.yaml"]},
)
