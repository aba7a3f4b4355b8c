"""The project is configured in pyproject.toml; this adds one build step: the search spaces
(top-level tune_spaces/, their one source) are shipped inside the package as sodm/tune_spaces/,
so that `python -m sodm.tune --space cifar10.yaml` finds them in any install, from any folder."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SPACES = Path(__file__).resolve().parent / "tune_spaces"


class BuildWithSpaces(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "sodm" / "tune_spaces"
        target.mkdir(parents=True, exist_ok=True)
        for space in sorted(SPACES.glob("*.yaml")):
            self.copy_file(str(space), str(target / space.name))


setup(cmdclass={"build_py": BuildWithSpaces})
