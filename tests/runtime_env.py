"""The Python environment `cog build` puts in the container, built on this machine without Docker.

`cog build` installs cog.yaml's `python_requirements` and the Cog SDK that `build.sdk_version`
pins, and nothing from requirements-dev.txt. `runtime_venv()` installs the same set into a fresh
virtualenv (no system site packages): `pip install -r requirements.txt cog==<sdk_version>
coglet==<sdk_version>`. It is kept in .cache/runtime-venv and built afresh only when
requirements.txt, cog.yaml or the interpreter change (the stamp file holds their sha256), so only
the first run of a fresh clone pays for it. TORCH_INDEX_URL works as for script/setup (CPU torch).

    .venv/bin/python tests/runtime_env.py      # build it by hand; prints its path
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "runtime-venv"
STAMP = VENV / ".inputs.sha256"
LOCK = ROOT / ".cache" / "runtime-venv.lock"
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


class BuildError(RuntimeError):
    """The runtime environment could not be built; the message carries the end of pip's output."""


def cog_config() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def sdk_version() -> str:
    return str(cog_config()["build"]["sdk_version"])


def requirements_file() -> Path:
    return ROOT / cog_config()["build"]["python_requirements"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file (not those it includes)."""
    found = {}
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            found[canonical(match[1])] = match[2]
    return found


def interpreter() -> str:
    """The Python of cog.yaml's python_version when it is on PATH, else the one running the tests."""
    wanted = str(cog_config()["build"]["python_version"])
    if ".".join(map(str, sys.version_info[:2])) == wanted:
        return sys.executable
    return shutil.which(f"python{wanted}") or sys.executable


def _digest(python: str) -> str:
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    ).stdout
    inputs = [(ROOT / "cog.yaml").read_bytes(), requirements_file().read_bytes(), version.encode()]
    return hashlib.sha256(b"\0".join(inputs)).hexdigest()


def _pip(python: Path, *arguments: str) -> None:
    result = subprocess.run(
        # --no-compile: byte-compiling torch and transformers at install time is most of the
        # build's CPU time; the few modules a test imports are compiled when first imported.
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--no-compile",
            "--disable-pip-version-check",
            *arguments,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise BuildError(
            f"building the runtime environment in {VENV.relative_to(ROOT)} failed: `pip install "
            f"{' '.join(arguments)}` exited with {result.returncode}. It needs a package index (PyPI, "
            "or PIP_INDEX_URL; TORCH_INDEX_URL for torch) the first time, and after each change to "
            f"requirements.txt or cog.yaml. pip's output ends with:\n{tail}"
        )


def runtime_venv() -> Path:
    """The runtime environment's directory, built first if it is missing or out of date."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, however many test runs wait for it
        python = interpreter()
        wanted = _digest(python)
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and STAMP.is_file() and STAMP.read_text().strip() == wanted:
            return VENV
        shutil.rmtree(VENV, ignore_errors=True)  # afresh: a dropped requirement must not linger
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
        requirements = requirements_file()
        torch = pins(requirements).get("torch")
        index = os.environ.get("TORCH_INDEX_URL")
        if index and torch:
            _pip(venv_python, "--index-url", index, f"torch=={torch}")
        version = sdk_version()
        _pip(venv_python, "-r", str(requirements), f"cog=={version}", f"coglet=={version}")
        STAMP.write_text(wanted + "\n")
        return VENV


if __name__ == "__main__":
    print(runtime_venv())
