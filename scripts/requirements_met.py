"""Exit 0 when this interpreter already has what ``pip install -e .[EXTRA...]`` would install
from this checkout: fedmq installed from here, and every requirement of pyproject.toml (and of
the named extras) in a version it allows; exit 1 otherwise.

Why: scripts/setup.sh runs before every test and demo run, and pip takes half a minute to
find that nothing is missing. Checked against pyproject.toml as it is now, so a requirement
added or narrowed since the last install is installed on the next run.
Usage: python scripts/requirements_met.py [EXTRA...]
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_from_here() -> bool:
    """fedmq imports from this checkout (an install of a checkout that has since moved does not)."""
    try:
        import fedmq
    except ImportError:
        return False
    return Path(fedmq.__file__).resolve().parent.parent == ROOT


def satisfied(requirement: str) -> bool:
    """The requirement's distribution is installed in a version its specifier allows."""
    from packaging.requirements import Requirement  # a dependency of pytest and matplotlib, among others

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return True
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def main(extras: list[str]) -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    if not installed_from_here():
        return 1
    try:
        return 0 if all(satisfied(r) for r in requirements) else 1
    except ImportError:  # no packaging: the dependencies are not installed yet
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
