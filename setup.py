"""Package discovery only (the project is described in pyproject.toml).

pyproject.toml cannot both find the package's folders and add configs/ under another name, so
this finds every folder of mtl_meniscus/ and adds the presets as mtl_meniscus.configs.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mtl_meniscus", "mtl_meniscus.*"]), "mtl_meniscus.configs"])
