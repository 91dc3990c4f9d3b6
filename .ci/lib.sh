# Shell functions shared by the CI jobs that build kne in a venv of their own (compat.sh, latest.sh).
# Source it after `cd` to the repository root, with ROOT=$PWD.

# copy_sources DEST: git's tracked and untracked-but-not-ignored files into DEST (emptied first), so
# that the job builds and tests a copy and the checkout's own build stays untouched.
copy_sources() {
  rm -rf "$1"
  mkdir -p "$1"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -I{} sh -c 'test ! -e "$1" || cp -p --parents "$1" "$2"' _ {} "$1")
}

# check_extension PY SRC [CUDA]: kne_kernels imports from SRC (not from elsewhere), its C++ library
# loads with live CPU kernels, and with CUDA given the CUDA kernels are registered too.
check_extension() {
  (cd "$2" && "$1" - "${3:-}" <<'PYEOF'
import os, sys
import kne_kernels
from kne_kernels import _extension
here = os.getcwd()
assert kne_kernels.__file__.startswith(here), kne_kernels.__file__
live, why = _extension.status("cpu")
keys = _extension.registered_keys()
print(f"{os.path.relpath(_extension.library_path(), here)}: CPU kernels live={live} ({why}); keys {', '.join(keys)}")
if not live or (sys.argv[1] == "CUDA" and "CUDA" not in keys):
    sys.exit("the extension built against this torch does not register its kernels")
PYEOF
  )
}

# versions PY: the Python and package versions of the venv, one line (CI logs name what they ran).
versions() {
  "$1" - <<'PYEOF'
import importlib.metadata as md, platform
names = ("torch", "triton", "transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors", "numpy",
         "gguf", "nltk", "tqdm", "kernels", "setuptools", "pytest", "hypothesis")
have = []
for n in names:
    try:
        have.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print(f"Python {platform.python_version()}, " + ", ".join(have))
PYEOF
}
