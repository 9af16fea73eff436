"""The image's lock of pins: every distribution the package needs at run time, at the version
installed here (where the test suite passed), found by walking the requirements from
fashion-exp's own. The image installs exactly these, from wheels, without a resolver."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fashion_exp.paths import PACKAGE_PARENT

PACKAGE = "fashion-exp"


class LockError(RuntimeError):
    """A requirement that is not installed here, so it cannot be pinned."""


def runtime_pins(exclude: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """{distribution name: installed version} of the package's run-time requirements and
    theirs, recursively, without extras it does not ask for; `exclude` drops the named ones
    and whatever only they need."""
    skip = {canonicalize_name(name) for name in exclude}
    pins: dict[str, str] = {}
    todo = [(req, "") for req in package_requirements()]
    seen: set[tuple[str, str]] = set()
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise LockError(f"{req.name} (needed by {PACKAGE}) is not installed here: run "
                            "./dev.sh setup") from None
        pins[name] = dist.version
        for wanted in [""] + sorted(req.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            todo += [(sub, wanted) for sub in dist.requires or []]
    return dict(sorted(pins.items()))


def package_requirements() -> list[str]:
    """The package's own run-time requirements: pyproject.toml's in a source tree (the
    installed metadata of an editable install lags behind edits), else the installed ones."""
    pyproject = PACKAGE_PARENT / "pyproject.toml"
    if pyproject.is_file():
        return tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in metadata.requires(PACKAGE) or [] if "extra ==" not in r]


def requirements_text(pins: dict[str, str]) -> str:
    """A pip requirements file of exact pins."""
    return "".join(f"{name}=={version}\n" for name, version in pins.items())
