"""Where the project lives: the repository of an editable install, else the working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The repository this package lives in (editable install), else the working directory."""
    return PACKAGE_PARENT if (PACKAGE_PARENT / "pyproject.toml").is_file() else Path.cwd()


def git_commit() -> str:
    """The checked-out commit of the project, with '-dirty' when files changed; 'unknown'."""
    root = project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
