"""Build hook for bmt-optim: compiles the C++ CPU Adam (``bmt_optim._cpu_adam``) when it can.

Hatchling runs ``CustomBuildHook`` for wheels and editable installs. It compiles
``csrc/cpu_adam.cpp`` with the C++ compiler it finds (``$CXX``, Python's configured ``CXX``,
``c++``, ``g++``, ``clang++``) against pybind11's headers, puts the extension in
``src/bmt_optim/`` (where editable installs import it from) and marks the wheel platform-specific.
No compiler, or a failed compile, is not an error: the package installs as pure Python and the
optimizer falls back to a vectorised torch implementation (with one warning at run time).

No ``-march=native``: SIMD variants are compiled with per-function target attributes and chosen
at run time, so the binary runs on any x86-64 CPU.

Development: ``python packages/bmt-optim/hatch_build.py`` builds the extension in place.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "csrc" / "cpu_adam.cpp"
PACKAGE_DIR = ROOT / "src" / "bmt_optim"
MODULE = "_cpu_adam"
SKIP_ENV = "BMT_OPTIM_NO_EXT"  # set to 1 to install without the extension (tests the fallback)


def extension_path() -> Path:
    return PACKAGE_DIR / (MODULE + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def find_compiler() -> list[str] | None:
    """The C++ compiler command (with its own flags), or None when there is none."""
    candidates: list[str] = []
    if os.environ.get("CXX"):
        candidates.append(os.environ["CXX"])
    configured = sysconfig.get_config_var("CXX")
    if configured:
        candidates.append(str(configured))
    candidates += ["c++", "g++", "clang++"]
    for cand in candidates:
        parts = shlex.split(cand)
        if parts and shutil.which(parts[0]):
            return parts
    return None


def compile_command(compiler: list[str], output: Path) -> list[str]:
    import pybind11

    include = sysconfig.get_paths()["include"]
    cmd = [
        *compiler,
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-ffp-contract=off",  # only the FMAs written in the source: both paths round the same way
        "-pthread",
        f"-I{pybind11.get_include()}",
        f"-I{include}",
        str(SOURCE),
        "-o",
        str(output),
    ]
    if sys.platform == "darwin":
        cmd += ["-undefined", "dynamic_lookup"]
    return cmd


def build_extension(force: bool = False, verbose: bool = True) -> Path | None:
    """Compile the extension into ``src/bmt_optim``; its path, or None when it could not be built."""
    if os.environ.get(SKIP_ENV) == "1":
        _say(f"{SKIP_ENV}=1: not building the C++ CPU Adam; the torch fallback will be used", verbose)
        return None
    out = extension_path()
    if not force and out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    compiler = find_compiler()
    if compiler is None:
        _say("no C++ compiler found: installing without the C++ CPU Adam (torch fallback)", verbose)
        return None
    try:
        cmd = compile_command(compiler, out.with_suffix(".tmp"))
    except ImportError:
        _say("pybind11 is not importable: installing without the C++ CPU Adam (torch fallback)", verbose)
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        _say(
            "compiling the C++ CPU Adam failed; installing without it (torch fallback).\n"
            f"command: {shlex.join(cmd)}\n{proc.stderr[-4000:]}",
            verbose,
        )
        out.with_suffix(".tmp").unlink(missing_ok=True)
        return None
    os.replace(out.with_suffix(".tmp"), out)
    _say(f"built {out}", verbose)
    return out


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[bmt-optim build] {msg}", file=sys.stderr)


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # running as a script without hatchling: the functions above still work
    pass
else:

    class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
        def initialize(self, version: str, build_data: dict[str, Any]) -> None:
            if self.target_name != "wheel":
                return
            built = build_extension()
            if built is None:
                return
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            # *.so is git-ignored, which hatchling honours: name it explicitly.
            build_data["artifacts"].append(str(built.relative_to(ROOT)))


if __name__ == "__main__":
    sys.exit(0 if build_extension(force="--force" in sys.argv) is not None else 1)
