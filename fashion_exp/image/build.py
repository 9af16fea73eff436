"""Build the prediction service's image with podman, without network access in the build.

The steps, in order: pin the run-time dependencies (lock.py), fetch their wheels on the host
into a cache (pip, from PyPI; kept between builds), build fashion_exp's own wheel, make the
Debian base image once (debootstrap; kept in podman's store and as a tarball in the cache),
copy the model in when one is named, then `podman build --network=none` from
Containerfile.in. Every step that failed says which and why, in one line (ImageError).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import parse_wheel_filename
from packaging.version import Version

from fashion_exp.image.lock import requirements_text, runtime_pins
from fashion_exp.image.model_folder import INFO_FILE, MODEL_DIR, BadModel, read_flavors
from fashion_exp.paths import PACKAGE_PARENT

TEMPLATE = Path(__file__).with_name("Containerfile.in")
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "fashion_exp", "hydra_plugins")
BASE_PACKAGES = ("python3", "python3-venv")  # added to debootstrap's minbase
# Left out of the base: what the image never reads (docs, man pages, translations, apt's
# package lists and downloaded .debs). Paths relative to the root file system.
BASE_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
             "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/templates.dat-old")


class ImageError(RuntimeError):
    """A build step that failed; the message is one line naming the step and the cause."""


@dataclass(frozen=True)
class Built:
    """What was built: tag, image id, size in bytes, and seconds per step."""

    tag: str
    image_id: str
    size: int
    seconds: dict[str, float]


def run(step: str, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a step's command; ImageError with its last output line if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise ImageError(f"{step}: {command[0]} is not installed (./dev.sh setup installs "
                         "podman and debootstrap)") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ImageError(f"{step} failed (exit {done.returncode}): "
                         f"{lines[-1] if lines else 'no output'}")
    return done


def image_exists(podman: str, name: str) -> bool:
    """Whether podman's store holds an image by that name."""
    return subprocess.run([podman, "image", "exists", name]).returncode == 0


# --- Dependencies: the lock and its wheels ---------------------------------------------------

def wheelhouse(pins: dict[str, str], cache: Path) -> dict[str, Path]:
    """{name: wheel file} for every pin, fetched into cache/wheels when missing (pip builds
    a wheel for the few pins published only as source)."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = wheels_in(folder, pins)
    missing = {name: version for name, version in pins.items() if name not in found}
    if missing:
        print(f"Fetching {len(missing)} wheels into {folder}", flush=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as lock:
            lock.write(requirements_text(missing))
            lock.flush()
            run("fetching wheels", [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                    "--disable-pip-version-check", "-w", str(folder),
                                    "-r", lock.name])
        found = wheels_in(folder, pins)
    if still := sorted(set(pins) - set(found)):
        raise ImageError(f"fetching wheels: no wheel for {', '.join(still[:5])}")
    return found


def wheels_in(folder: Path, pins: dict[str, str]) -> dict[str, Path]:
    """The wheels in `folder` that match a pin exactly (name and version)."""
    found: dict[str, Path] = {}
    for path in folder.glob("*.whl"):
        name, version, *_ = parse_wheel_filename(path.name)
        if name in pins and version == Version(pins[name]):
            found[name] = path
    return found


def package_wheel(folder: Path) -> Path:
    """fashion_exp's own wheel, built into `folder` from a copy of the sources (a build in
    place would leave build/ and egg-info folders in the checkout)."""
    with tempfile.TemporaryDirectory(prefix="src-", dir=folder.parent) as src:
        for name in PACKAGE_SOURCES:
            source = PACKAGE_PARENT / name
            if source.is_dir():
                shutil.copytree(source, Path(src) / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, Path(src) / name)
        run("building fashion_exp's wheel",
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
             "--disable-pip-version-check", "-w", str(folder), src])
    (wheel,) = folder.glob("fashion_exp-*.whl")
    return wheel


# --- The base image ------------------------------------------------------------------------

def base_image(podman: str, name: str, cache: Path, suite: str, mirror: str) -> None:
    """Make `name` (Debian minbase with Python) unless podman has it: imported from the
    cached tarball, or debootstrapped from Debian's mirror first (about a minute)."""
    if image_exists(podman, name):
        return
    tarball = cache / f"base-{suite}.tar"
    if not tarball.exists():
        print(f"Bootstrapping Debian {suite} from {mirror} into {tarball}", flush=True)
        with tempfile.TemporaryDirectory(prefix="fashion-exp-base-", dir=cache) as root:
            try:
                run("debootstrap", ["debootstrap", "--variant=minbase",
                                    f"--include={','.join(BASE_PACKAGES)}", suite, root,
                                    mirror])
            finally:  # a failed debootstrap may leave /proc and /sys mounted in the tree
                for mount in ("proc", "sys"):
                    subprocess.run(["umount", "-R", "-l", f"{root}/{mount}"],
                                   capture_output=True)
            for path in BASE_TRIM:
                target = Path(root) / path
                if target.is_dir():
                    for child in target.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
                elif target.exists():
                    target.unlink()
            partial = tarball.with_suffix(".partial")
            run("packing the base", ["tar", "-C", root, "--numeric-owner", "-cf", str(partial),
                                     "."])
            partial.rename(tarball)
    run("importing the base", [podman, "import", str(tarball), name])


# --- The model ----------------------------------------------------------------------------

def fetch_model(model_uri: str, tracking_uri: str, folder: Path) -> dict[str, Any]:
    """Copy the logged model `model_uri` names into `folder` (an MLflow model folder), with
    fashion_exp_model.json beside MLmodel; the info written. ConfigError-like ImageError if
    it names nothing."""
    import mlflow

    from fashion_exp.core.metrics import PER_CLASS_PREFIX
    from fashion_exp.tracking import logged_models

    client = mlflow.MlflowClient(tracking_uri)
    try:
        ref = logged_models.resolve(client, model_uri)
    except logged_models.UnknownModel as err:
        raise ImageError(f"model_uri={model_uri!r} {err.reason} ({tracking_uri})") from None
    with tempfile.TemporaryDirectory(prefix="model-", dir=folder.parent) as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=ref.location, dst_path=tmp,
                                                  tracking_uri=tracking_uri)
        shutil.copytree(got, folder, dirs_exist_ok=True)
    try:  # a model the image could not serve fails the build, not the container's start
        read_flavors(folder)
    except BadModel as err:
        raise ImageError(f"model_uri={model_uri!r}: {err}") from None
    info = {"uri": model_uri, "name": ref.name, "version": ref.version, "run_id": ref.run_id,
            "run_name": client.get_run(ref.run_id).info.run_name,
            "metrics": {m.key: m.value for m in client.get_logged_model(ref.model_id).metrics or []
                        if not m.key.startswith(PER_CLASS_PREFIX)}}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def model_tarball(folder: Path, target: Path) -> None:
    """model.tar.gz as SageMaker wants it: the model folder's files at the archive's top."""
    import tarfile

    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as archive:
        for child in sorted(folder.iterdir()):
            archive.add(child, arcname=child.name)


# --- The build ----------------------------------------------------------------------------

def sources_sha256() -> str:
    """SHA-256 of the package's sources (names and contents): the package layer's cache key,
    the same for the same code (its wheel's bytes differ per build: timestamps)."""
    digest = hashlib.sha256()
    for name in PACKAGE_SOURCES:
        root = PACKAGE_PARENT / name
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(str(path.relative_to(PACKAGE_PARENT)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (same file system: instant), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build(tag: str, model_uri: str | None, tracking_uri: str | None, cache: Path,
          base: str, suite: str, mirror: str, exclude: list[str], podman: str = "podman",
          tarball: Path | None = None) -> Built:
    """Build `tag` into podman's store; the model of `model_uri` baked in when given."""
    seconds: dict[str, float] = {}
    started = time.monotonic()

    def lap(step: str) -> None:
        nonlocal started
        seconds[step] = round(time.monotonic() - started, 1)
        started = time.monotonic()

    if not shutil.which(podman):
        raise ImageError(f"podman={podman!r} is not installed: ./dev.sh setup installs podman")
    cache.mkdir(parents=True, exist_ok=True)
    pins = runtime_pins(exclude)
    with tempfile.TemporaryDirectory(prefix="context-", dir=cache) as tmp:
        context = Path(tmp)
        for sub in ("wheels", "pkg", "model"):
            (context / sub).mkdir()
        info = None
        if model_uri:
            info = fetch_model(model_uri, tracking_uri or "", context / "model")
            if tarball:
                model_tarball(context / "model", tarball)
            lap("model")
        for wheel in wheelhouse(pins, cache).values():
            link_or_copy(wheel, context / "wheels" / wheel.name)
        lock = requirements_text(pins)
        (context / "wheels" / "requirements.txt").write_text(lock)
        lap("wheels")
        wheel = package_wheel(context / "pkg")
        lap("package")
        base_image(podman, base, cache, suite, mirror)
        lap("base")
        description = (f"serves {model_uri}" if info else f"serves the model in {MODEL_DIR}")
        (context / "Containerfile").write_text(TEMPLATE.read_text().format(
            suite=suite, base=base, lock_sha=hashlib.sha256(lock.encode()).hexdigest(),
            pkg_sha=sources_sha256(), pkg_wheel=wheel.name, description=description,
            model_step=f"COPY model {MODEL_DIR}" if info else "# (no model: mount one)"))
        print(f"Building {tag} with podman (no network in the build)", flush=True)
        command = [podman, "build", "--network=none", "--layers", "-t", tag, "-f",
                   str(context / "Containerfile"), str(context)]
        done = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if line.strip()]
            raise ImageError(f"podman build failed (exit {done.returncode}): "
                             f"{last[-1] if last else 'no output'}")
        lap("podman build")
    shown = run("inspecting the image", [podman, "image", "inspect", tag, "--format",
                                         "{{.Id}} {{.Size}}"]).stdout.split()
    return Built(tag, shown[0][:12], int(shown[1]), seconds)
