"""Every public module, class, function and method of fedloom has a docstring (what the API reference shows).

Public: a name not starting with ``_``, in a module whose dotted path has no part starting with ``_``
(``__init__`` modules are the packages themselves), defined in that module (imports are checked where they
are defined). The generated gRPC modules (``deploy_pb2*``) are left out. A method counts as documented when
``inspect.getdoc`` finds a docstring, its own or the one of the base-class method it overrides (what
mkdocstrings renders); a class needs its own (a dataclass's or named tuple's generated signature is none).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from types import ModuleType

import pytest

GENERATED = ("deploy_pb2",)  # protoc's output: deploy_pb2.py, deploy_pb2_grpc.py


def public_modules(package: str) -> list[ModuleType]:
    """The package and its public submodules, imported."""
    root = importlib.import_module(package)
    names = [package] + [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")]
    keep = [n for n in names if not any(p.startswith("_") for p in n.split(".")[1:])]
    return [importlib.import_module(n) for n in keep if not n.rsplit(".", 1)[-1].startswith(GENERATED)]


def own_class_doc(cls: type) -> str | None:
    """The class's own docstring; None for none or one generated from the signature (dataclass, namedtuple)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or not doc.strip() or doc.startswith(f"{cls.__name__}("):
        return None
    return doc


def method_members(cls: type) -> list[tuple[str, object]]:
    """(name, function) of the public methods and properties defined in the class body itself; a dataclass
    field's default (a function as a value, such as ``init=no_state``) is no method."""
    found, fields = [], getattr(cls, "__dataclass_fields__", {})
    for name, raw in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        function = raw.fget if isinstance(raw, property) else getattr(raw, "__func__", raw)
        if inspect.isfunction(function):
            found.append((name, function))
    return found


def undocumented_in(module: ModuleType) -> list[str]:
    """Dotted names of the module's public definitions (and the module itself) lacking a docstring."""
    missing = [] if (module.__doc__ or "").strip() else [module.__name__]
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        where = f"{module.__name__}.{name}"
        if inspect.isfunction(obj) and not (obj.__doc__ or "").strip():
            missing.append(where)
        elif inspect.isclass(obj):
            missing += [] if own_class_doc(obj) else [where]
            missing += [f"{where}.{m}" for m, _ in method_members(obj) if not inspect.getdoc(getattr(obj, m))]
    return missing


def undocumented(package: str) -> list[str]:
    return [name for module in public_modules(package) for name in undocumented_in(module)]


def test_every_public_definition_has_a_docstring():
    missing = undocumented("fedloom")
    assert missing == [], f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)


def test_the_walk_sees_the_whole_api():
    """Guards the walker: it reaches the subpackages, classes, methods and properties."""
    modules = {m.__name__ for m in public_modules("fedloom")}
    assert {"fedloom.runner", "fedloom.algorithms.scaffold", "fedloom.deploy.server", "fedloom.core.rng"} <= modules
    assert not any(name.startswith("fedloom.deploy.deploy_pb2") for name in modules)
    from fedloom.core.params import ParamSpec

    assert "flatten" in dict(method_members(ParamSpec))


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package ``toy_api`` to write modules into; its modules are forgotten afterwards."""
    (tmp_path / "toy_api").mkdir()
    (tmp_path / "toy_api" / "__init__.py").write_text('"""A toy package."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "toy_api"
    for name in [n for n in sys.modules if n == "toy_api" or n.startswith("toy_api.")]:
        del sys.modules[name]


TOY = '''"""A module."""
import dataclasses
from os.path import join  # imported: checked where it is defined


class Base:
    """A base."""

    def step(self):
        """Take a step."""


class Child(Base):
    """Overrides step: documented by the base's docstring."""

    def step(self):
        return 1

    def new_method(self):
        return 2

    @property
    def size(self):
        return 3

    def _private(self):
        return 4


@dataclasses.dataclass
class Record:
    x: int
    make: object = lambda: 0  # a field's default, not a method


def documented():
    """Yes."""


def bare():
    return 5


def _hidden():
    return 6
'''


def test_missing_docstrings_are_listed(toy_package):
    (toy_package / "parts.py").write_text(TOY)
    (toy_package / "_internal.py").write_text("def helper():\n    return 7\n")
    (toy_package / "nodoc.py").write_text("X = 1\n")
    assert sorted(undocumented("toy_api")) == ["toy_api.nodoc", "toy_api.parts.Child.new_method",
                                               "toy_api.parts.Child.size", "toy_api.parts.Record",
                                               "toy_api.parts.bare"]


def test_a_new_undocumented_function_in_fedloom_fails(monkeypatch):
    """A public function added to a fedloom module without a docstring is reported by name."""
    from fedloom import runner

    def added_without_a_docstring():
        return 0

    added_without_a_docstring.__module__ = runner.__name__
    monkeypatch.setattr(runner, "added_without_a_docstring", added_without_a_docstring, raising=False)
    assert "fedloom.runner.added_without_a_docstring" in undocumented_in(runner)
