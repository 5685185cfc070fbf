"""Check that a folder of wheels is closed under its requirements, for Python 3.12 on Linux x86-64.

Every `Requires-Dist` (no extras; markers evaluated for CPython 3.12, Linux, x86-64) of every wheel
in DIR must be met by a wheel in DIR, by a name given with --provided (what the target machine is
known to have, e.g. torch), or, with --installed, by a distribution installed in this Python.
Exits 1 listing what is missing, so that `pip install --no-index` cannot fail half-way later.

    python benchmarks/check_wheels.py benchmarks/wheels --provided torch torchvision numpy pillow
    python3 benchmarks/check_wheels.py benchmarks/wheels --installed     # on the CUDA machine
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare Python: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def wheel_metadata(path: Path) -> tuple[str, Version, list[str]]:
    """(canonical name, version, Requires-Dist lines) of one wheel."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    return canonicalize_name(meta["Name"]), Version(meta["Version"]), meta.get_all("Requires-Dist") or []


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--provided", nargs="*", default=[], help="names the target machine has (any version)")
    ap.add_argument("--installed", action="store_true", help="also accept what this Python has installed")
    args = ap.parse_args(argv)
    wheels = sorted(args.dir.glob("*.whl"))
    if not wheels:
        print(f"check_wheels: no wheels in {args.dir} (run benchmarks/fetch_gpu_wheels.sh)", file=sys.stderr)
        return 1
    have: dict[str, Version] = {}
    requires: dict[str, list[str]] = {}
    for path in wheels:
        name, version, reqs = wheel_metadata(path)
        if name in have:
            print(f"check_wheels: two versions of {name} in {args.dir}: pip would refuse", file=sys.stderr)
            return 1
        have[name], requires[name] = version, reqs
    provided = {canonicalize_name(n) for n in args.provided}
    missing = []
    for owner, reqs in requires.items():
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET):
                continue
            dep = canonicalize_name(req.name)
            if dep in provided:
                continue
            version = have.get(dep)
            if version is None and args.installed:
                version = installed_version(dep)
            if version is None or not req.specifier.contains(version, prereleases=True):
                missing.append(f"{owner} needs {line}" + (f" (found {version})" if version else ""))
    if missing:
        print("check_wheels: unmet requirements:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in wheels) / 2**20
    print(f"check_wheels: {len(wheels)} wheels, {size:.1f} MiB, every requirement met"
          + (f" (given: {', '.join(sorted(provided))})" if provided else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
