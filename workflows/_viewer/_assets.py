"""The viewer's browser dependencies (OpenSeadragon from the npm registry), found and installed.

Nothing from npm is committed to the repository or shipped in the wheel: ``package.json`` and
``package-lock.json`` (one pinned package, with its integrity hash) travel as package data, and
``oncotrace viewer-setup`` (:func:`setup_viewer`) runs ``npm ci`` on them.

Where the packages go: a per-user cache folder keyed by a hash of the lock file,
``$XDG_CACHE_HOME/oncotrace/viewer/<hash>`` (``~/.cache/...`` by default; ``$ONCOTRACE_VIEWER_DIR``
overrides the whole path). That one location works the same for an editable checkout, a wheel in
a read-only site-packages and a CI runner; an upgrade that changes the pinned version changes the
hash, so a stale install is never picked up, and uninstalling the package leaves nothing inside
site-packages. Developers who prefer plain npm may instead run
``npm ci --prefix workflows/_viewer`` in a checkout: :func:`openseadragon_dir` also looks at the
package folder's own ``node_modules``, and in both places accepts only the pinned version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: The command a user runs to install the viewer's browser dependencies.
SETUP_COMMAND = "oncotrace viewer-setup"

_PACKAGE_DIR = Path(__file__).resolve().parent
_MANIFESTS = ("package.json", "package-lock.json")
_OSD_BUILD = Path("node_modules", "openseadragon", "build", "openseadragon")
_OSD_SCRIPT = "openseadragon.min.js"


def package_dir() -> Path:
    """The folder holding ``package.json``, ``package-lock.json`` and ``static/``."""
    return _PACKAGE_DIR


def static_dir() -> Path:
    """The viewer's own pages, scripts and styles (package data)."""
    return _PACKAGE_DIR / "static"


def pinned_openseadragon_version() -> str:
    """OpenSeadragon's version as pinned in ``package-lock.json`` (e.g. ``"6.1.1"``)."""
    lock_path = _PACKAGE_DIR / "package-lock.json"
    try:
        lock = json.loads(lock_path.read_text(encoding="utf-8"))
        return str(lock["packages"]["node_modules/openseadragon"]["version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileNotFoundError(
            f"{lock_path}: cannot read the pinned OpenSeadragon version ({exc}). "
            "Fix: reinstall oncotrace; the lock file is package data."
        ) from exc


def install_dir() -> Path:
    """Where :func:`setup_viewer` installs the npm packages by default.

    ``$ONCOTRACE_VIEWER_DIR`` if set, else ``<user cache>/oncotrace/viewer/<lock hash>``.
    """
    override = os.environ.get("ONCOTRACE_VIEWER_DIR")
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256()
    for name in _MANIFESTS:
        digest.update((_PACKAGE_DIR / name).read_bytes())
    return Path(cache).expanduser() / "oncotrace" / "viewer" / digest.hexdigest()[:12]


def installed_version(root: Path) -> str | None:
    """Version of the OpenSeadragon installed under ``root`` (a folder holding
    ``node_modules``), or None when there is none."""
    if not (root / _OSD_BUILD / _OSD_SCRIPT).is_file():
        return None
    meta = root / "node_modules" / "openseadragon" / "package.json"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def openseadragon_dir() -> Path:
    """OpenSeadragon's build folder (``openseadragon.min.js`` and ``images/``), pinned version.

    Looked up in :func:`install_dir` and then in the package folder's own ``node_modules``.

    Raises
    ------
    FileNotFoundError
        When neither holds the pinned version; the message names the setup command.
    """
    want = pinned_openseadragon_version()
    seen: list[str] = []
    for root in (install_dir(), _PACKAGE_DIR):
        have = installed_version(root)
        if have == want:
            return root / _OSD_BUILD
        seen.append(f"{root / _OSD_BUILD} ({'missing' if have is None else 'version ' + have})")
    raise FileNotFoundError(
        f"OpenSeadragon {want}, the viewer's deep-zoom library, is not installed; looked in "
        f"{'; '.join(seen)}. Fix: run `{SETUP_COMMAND}` once (needs Node.js's npm and the npm "
        "registry), or `npm ci --prefix workflows/_viewer` in a source checkout."
    )


def setup_viewer(target: Path | None = None, *, force: bool = False, npm: str = "npm") -> Path:
    """Install the pinned npm packages with ``npm ci`` and return OpenSeadragon's build folder.

    The install runs in a temporary sibling folder that is renamed into place only once it is
    complete, so an interrupted setup never leaves a folder that looks finished.

    Parameters
    ----------
    target : Path, optional
        Folder to install into (it gets ``package.json``, the lock file and ``node_modules``).
        Default: :func:`install_dir`.
    force : bool
        Reinstall even when the pinned version is already there.
    npm : str
        The npm executable (name on ``PATH`` or a path).

    Returns
    -------
    Path
        ``<target>/node_modules/openseadragon/build/openseadragon``.

    Raises
    ------
    FileNotFoundError
        ``npm`` is not installed.
    RuntimeError
        ``npm ci`` failed (its output is in the message) or installed something unexpected.
    """
    target = Path(target) if target is not None else install_dir()
    want = pinned_openseadragon_version()
    if not force and installed_version(target) == want:
        return target / _OSD_BUILD
    exe = shutil.which(npm)
    if exe is None:
        raise FileNotFoundError(
            f"`{npm}` was not found on PATH; the viewer's OpenSeadragon comes from the npm "
            "registry. Fix: install Node.js with npm (Debian/Ubuntu: `apt-get install npm`; "
            "elsewhere https://nodejs.org), then run `oncotrace viewer-setup` again."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared $ONCOTRACE_VIEWER_DIR from others
    try:
        for name in _MANIFESTS:
            shutil.copyfile(_PACKAGE_DIR / name, staging / name)
        # --ignore-scripts: nothing from the registry runs on the user's machine.
        cmd = [exe, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev"]
        proc = subprocess.run(cmd, cwd=staging, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise RuntimeError(
                f"`{' '.join(cmd)}` in {staging} failed (exit {proc.returncode}):\n{tail}\n"
                "Fix: check that the npm registry is reachable (proxy: `npm config set proxy`), "
                "then run `oncotrace viewer-setup` again."
            )
        have = installed_version(staging)
        if have != want:
            raise RuntimeError(
                f"`npm ci` in {staging} installed OpenSeadragon {have}, not the pinned {want}. "
                "Fix: run `oncotrace viewer-setup --force`; report a bug if it persists."
            )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target / _OSD_BUILD
