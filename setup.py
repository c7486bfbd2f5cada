"""Build hook: ship the repository's named configs (`configs/*.yaml`) inside the package as `imr_model/configs/`.

`configs/` at the top of the repository stays the one place users read and edit them; a build copies
them into the wheel (and lists them in the sdist), so `--config tiny` resolves from an installed wheel
too (`imr_model.config.CONFIG_DIR`). Everything else is in pyproject.toml.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIG_SOURCE = "configs"  # relative to the project root (the build's working directory)
CONFIG_PACKAGE_DIR = os.path.join("imr_model", "configs")


class build_py_with_configs(build_py):
    """`build_py` whose package data also holds configs/*.yaml, built to imr_model/configs/.

    Adding them to `data_files` (not copying them after the fact) puts them in the wheel's file list,
    the sdist (setuptools' sdist takes build_py's data files) and strict editable installs alike.
    """

    def _configs(self) -> list:
        names = sorted(n for n in os.listdir(CONFIG_SOURCE) if n.endswith(".yaml")) if os.path.isdir(CONFIG_SOURCE) else []
        return [("imr_model", CONFIG_SOURCE, os.path.join(self.build_lib, CONFIG_PACKAGE_DIR), names)] if names else []

    def _get_data_files(self):  # wheel contents (build_package_data, get_outputs)
        return list(super()._get_data_files()) + self._configs()

    def get_data_files_without_manifest(self):  # what egg_info's manifest (hence the sdist) lists
        return list(super().get_data_files_without_manifest()) + self._configs()


setup(cmdclass={"build_py": build_py_with_configs})
