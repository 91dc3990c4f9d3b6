"""Installs both packages from one place -- ``kne`` (from python/kne) and ``kne_kernels`` -- and
builds the C++ op library ``kne_kernels/_C`` (CPU kernels; plus CUDA kernels when possible).

Switches (environment):
  KNE_NO_EXT=1            build no extension (kne_kernels then runs its torch and Triton kernels)
  FORCE_CUDA=1            build the CUDA kernels even where torch or nvcc say otherwise
                          (by default: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "8.0;9.0" (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (with ninja)
  CUDA_HOME               the CUDA toolkit root; by default taken from ``nvcc --dryrun`` (its
                          ``_HERE_`` line, one folder up), since a wrapper script on the PATH
                          misleads torch's own guess

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
already installed (the ABI must match the torch that loads it). A wheel build (``pip wheel``,
``pip install .``) writes nothing into the source tree: setuptools' ``build/`` and
``kne.egg-info/`` go to a temporary folder, removed at the end.
"""

import atexit
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_namespace_packages, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The C++ standard of every translation unit, host and CUDA. CMakeLists.txt sets the same
# (CMAKE_CXX_STANDARD) and benchmarks/speed/cuda_static.py reads it from here; tests/ops/test_registry.py
# checks that the three agree.
CXX_STANDARD = "c++20"
# Every package under python/ (kne, its subpackages, and its data folders kne.data and
# kne.data.knowedit, which hold no module) and kne_kernels/, found rather than listed: a hand list once
# left kne.integrations out of the wheel (tests/test_packaging.py checks the list).
PACKAGES = (find_namespace_packages(os.path.join(ROOT, "python"), include=["kne", "kne.*"])
            + find_packages(ROOT, include=["kne_kernels", "kne_kernels.*"]))
PACKAGE_DIR = {"kne": "python/kne", "kne_kernels": "kne_kernels"}
# The KnowEdit records (gzip, with their licence and citation) ship inside the kne package.
PACKAGE_DATA = {"kne": ["data/*.json", "data/knowedit/*.json.gz", "data/knowedit/LICENSE", "data/knowedit/README.md",
                        "data/hparams/KNE/*.yaml"],
                "kne_kernels": ["_build_info.json"]}


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home_from_nvcc():
    """The toolkit root from ``nvcc --dryrun``: its ``#$ _HERE_=<root>/bin`` line."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def _ext_modules():
    if _truthy("KNE_NO_EXT"):
        print("kne: KNE_NO_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}
    if not os.environ.get("CUDA_HOME"):
        home = _cuda_home_from_nvcc()
        if home:
            os.environ["CUDA_HOME"] = home
    try:
        import torch
    except ImportError:
        sys.exit("kne: the C++ extension builds against the torch already installed, and there is none: install "
                 "torch first (CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu), then "
                 "pip install --no-build-isolation . (or KNE_NO_EXT=1 pip install . to build no extension)")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _truthy("FORCE_CUDA") or (torch.version.cuda is not None and shutil.which("nvcc") is not None)
    if with_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch (this one is CPU-only: " + torch.__version__ + ")")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp", f"-std={CXX_STANDARD}"]
    define = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        define = [("KNE_WITH_CUDA", None)]
        ext = CUDAExtension("kne_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                            define_macros=define,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", f"-std={CXX_STANDARD}", "-lineinfo"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("kne_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args=cxx, extra_link_args=["-fopenmp"])

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": bool(with_cuda),
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cuda_home": os.environ.get("CUDA_HOME") if with_cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }

    class BuildExt(BuildExtension):
        """Writes kne_kernels/_build_info.json (the facts the loader reports on a failed load) beside
        the library it built: into the source tree only for an in-place (editable) build."""

        def run(self):
            print(f"kne: compiling kne_kernels._C ({len(sources)} files, MAX_JOBS={os.environ.get('MAX_JOBS', 'all')}; "
                  "about 1.5 minutes on 2 cores)", file=sys.stderr, flush=True)
            super().run()
            in_place = self.inplace or getattr(self, "editable_mode", False)
            path = os.path.join(ROOT if in_place else self.build_lib, "kne_kernels")
            if os.path.isdir(path):
                with open(os.path.join(path, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)

    print(f"kne: building kne_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'}) against torch {torch.__version__}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExt}


def _out_of_tree_options():
    """setuptools' build and egg-info folders in a temporary folder, unless the build is editable
    (``pip install -e``: the library lands in the tree, and ninja reuses its objects under build/)."""
    if {"develop", "editable_wheel"} & set(sys.argv) or "--inplace" in sys.argv:
        return {}
    tmp = tempfile.mkdtemp(prefix="kne-setup-")
    atexit.register(shutil.rmtree, tmp, True)
    return {"build": {"build_base": os.path.join(tmp, "build")}, "egg_info": {"egg_base": tmp}}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=_out_of_tree_options(),
)
