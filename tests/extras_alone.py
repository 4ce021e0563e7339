"""Which installed modules an optional extra may import, and a meta-path finder refusing the rest.

The allowed distributions are the closure, over their declared requirements, of fedloom's core
dependencies and of one extra's (read from this checkout's pyproject.toml); every other installed
distribution's modules (the other extras', the test tools) are refused as a missing package would be.
Run as ``python extras_alone.py BLOCKED.json -c CODE [ARGS...]``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_TOOLS = {"pip", "setuptools", "wheel"}  # what any venv has; some libraries import pkg_resources
SELF = re.compile(r"^fedloom\[([\w,-]+)\]$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """Core requirements and each extra's, with ``fedloom[a,b]`` expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(requirements: list[str]) -> list[str]:
        out = []
        for requirement in requirements:
            named = SELF.match(requirement.replace(" ", ""))
            out += expand([r for e in named.group(1).split(",") for r in extras[e]]) if named else [requirement]
        return out

    return project["dependencies"], {name: expand(reqs) for name, reqs in extras.items()}


def closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements pull in, transitively (markers evaluated here)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        text, extra = todo.pop()
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonical(requirement.name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for wanted in ["", *requirement.extras]:
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                todo += [(r, wanted) for r in requires]
    return {name for name, _ in seen}


def blocked_modules(extra: str, also_block: set[str] = frozenset()) -> list[str]:
    """Module names (top level, or ``top.sub`` inside a shared namespace such as ``google``) that belong
    only to distributions outside core + ``extra``, plus ``also_block``'s distributions."""
    core, extras = project_requirements()
    allowed = (closure(core) | closure(extras[extra]) | VENV_TOOLS | {"fedloom"}) - also_block
    owners = metadata.packages_distributions()
    blocked = []
    for module, dists in owners.items():
        names = {canonical(d) for d in dists}
        if names <= allowed:
            continue
        if names.isdisjoint(allowed):
            blocked.append(module)
        else:  # a namespace shared with allowed distributions: refuse the others' sub-packages
            blocked += sorted(_subpackages(module, names - allowed) - _subpackages(module, names & allowed))
    return sorted(blocked)


def _subpackages(top: str, dists: set[str]) -> set[str]:
    found = set()
    for dist in dists:
        for file in metadata.distribution(dist).files or []:
            parts = file.parts
            if len(parts) > 2 and parts[0] == top:
                found.add(f"{top}.{parts[1].removesuffix('.py')}")
    return found


class Blocker(importlib.abc.MetaPathFinder):
    """The path finder, blind to the blocked modules and their submodules where they are installed (copies a
    library vendors elsewhere, as Ray does colorama, stay): imports of them fail and ``importlib.util.find_spec``
    (how libraries probe optional packages) gives None, as if not installed."""

    def __init__(self, blocked: list[str]):
        self.blocked = set(blocked)
        self.sites = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}

    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        parts = name.split(".")
        if spec is not None and any(".".join(parts[:i]) in self.blocked for i in (1, 2)) and self.installed(spec):
            return None
        return spec

    def installed(self, spec) -> bool:
        """Found as a top-level entry of site-packages (not a copy inside another package)."""
        where = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations))
        top, path = spec.name.partition(".")[0], Path(where).resolve()
        entries = [path.relative_to(site).parts[0] for site in self.sites if path.is_relative_to(site)]
        return any(entry == top or entry.startswith(f"{top}.") for entry in entries)  # a package, six.py, a .so

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        """Installed metadata stays readable (libraries read their own version): only imports are refused."""
        return importlib.machinery.PathFinder.find_distributions(context)


def main(argv: list[str]) -> None:
    blocked, flag, code, *args = argv
    assert flag == "-c", "usage: extras_alone.py BLOCKED.json -c CODE [ARGS...]"
    finder = Blocker(json.loads(Path(blocked).read_text()))
    sys.meta_path[:] = [finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    sys.argv = ["-c", *args]
    exec(compile(code, "<smoke>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main(sys.argv[1:])
