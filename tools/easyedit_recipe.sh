#!/usr/bin/env bash
# Installs EasyEdit beside kne (docs/easyedit.md): the packages EasyEdit's `import easyeditor`
# needs, unpinned, with every package already installed (kne's torch and transformers among them)
# held at its version, then makes the checkout importable with a .pth file.
#
#   bash tools/easyedit_recipe.sh EASYEDIT_CHECKOUT [PYTHON]
#
# EASYEDIT_CHECKOUT: a clone of https://github.com/zjunlp/EasyEdit (the recipe was verified at
# EASYEDIT_COMMIT below); PYTHON: the interpreter of the environment kne is installed in (default:
# python3 on the PATH). TORCHVISION_INDEX_URL: where torchvision comes from (default: PyPI, or
# https://download.pytorch.org/whl/cpu when torch is a CPU-only build on Linux; PyPI's Linux
# torchvision links against CUDA torch and does not load beside a CPU-only torch).
#
# EasyEdit's own requirements.txt is not used: it pins torch==2.9.1 and transformers==5.5.4, which
# kne (torch>=2.11, transformers>=5.17) rules out. tests/test_easyedit_recipe.py checks that
# docs/easyedit.md lists the same packages as EASYEDIT_PACKAGES.
set -euo pipefail

EASYEDIT_COMMIT=14cea8245f06715684592ab55184939b99d70784
# Every third-party module `import easyeditor` loads at this commit (its __init__ imports every
# submodule), as PyPI names; opencv-python-headless gives the same cv2 as EasyEdit's opencv-python
# (EasyEdit opens no window). kne already brings torch, transformers, accelerate, safetensors,
# numpy, nltk, PyYAML, regex, tqdm and huggingface-hub.
EASYEDIT_PACKAGES=(
    av datasets einops fairscale higher hydra-core iopath matplotlib omegaconf openai
    opencv-python-headless pandas peft pillow qwen-vl-utils rouge scikit-learn scipy
    sentence-transformers timm torchvision zhipuai
)

die() { echo "easyedit_recipe: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash tools/easyedit_recipe.sh EASYEDIT_CHECKOUT [PYTHON]"
[ -f "$1/easyeditor/__init__.py" ] || die "$1 is not an EasyEdit checkout (no easyeditor/__init__.py)"
checkout=$(cd "$1" && pwd)
py=${2:-python3}
"$py" -c "import kne, torch, transformers" 2>/dev/null \
    || die "$py cannot import kne, torch and transformers: install kne first (docs/easyedit.md, step 1)"

if commit=$(git -C "$checkout" rev-parse HEAD 2>/dev/null); then
    [ "$commit" = "$EASYEDIT_COMMIT" ] \
        || echo "easyedit_recipe: note: $checkout is at $commit; the recipe was verified at $EASYEDIT_COMMIT" >&2
fi
"$py" - <<'EOF'
import importlib.metadata as md
print("easyedit_recipe: beside kne " + ", ".join(f"{p} {md.version(p)}" for p in ("kne", "torch", "transformers")))
EOF

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# hold every installed package (name==version lines; editable and URL installs are left out)
"$py" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' > "$work/installed.txt" || true

index=()
if [ -n "${TORCHVISION_INDEX_URL:-}" ]; then
    index=(--extra-index-url "$TORCHVISION_INDEX_URL")
elif "$py" -c "import sys, torch; sys.exit(not (sys.platform.startswith('linux') and torch.version.cuda is None and torch.version.hip is None))"; then
    index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
# torchvision first, the build that matches torch's (timm would otherwise pull PyPI's)
"$py" -m pip install -c "$work/installed.txt" ${index[@]+"${index[@]}"} torchvision
if ! "$py" -c "import torchvision" > /dev/null; then
    versions=$("$py" -c "import importlib.metadata as m; print('torchvision', m.version('torchvision'), 'beside torch', m.version('torch'))")
    die "$versions does not load (above): it is not the build that matches torch's. pip uninstall torchvision, then rerun with TORCHVISION_INDEX_URL set to the index torch came from (https://download.pytorch.org/whl/cpu for a CPU-only build)"
fi
"$py" -m pip install -c "$work/installed.txt" "${EASYEDIT_PACKAGES[@]}"

# EasyEdit ships no setup.py or pyproject.toml at this commit, so pip cannot install it (-e or
# not): a .pth file puts the checkout on this environment's sys.path (PYTHONPATH=checkout does the same)
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$checkout" > "$purelib/easyedit.pth"
echo "easyedit_recipe: wrote $purelib/easyedit.pth ($checkout)"

"$py" - "$checkout" <<'EOF'
import os, sys, warnings
warnings.simplefilter("ignore")
import easyeditor
from easyeditor import BaseEditor  # noqa: F401
from easyeditor.util.alg_dict import ALG_DICT
from kne.integrations.easyedit import apply_kne_to_model
where = os.path.dirname(os.path.dirname(os.path.abspath(easyeditor.__file__)))
if where != os.path.abspath(sys.argv[1]):
    sys.exit(f"easyedit_recipe: easyeditor is imported from {where}, not from {sys.argv[1]}")
ALG_DICT["KNB"] = ALG_DICT["KNE"] = apply_kne_to_model
print(f"easyedit_recipe: import easyeditor works ({where}); run KNE_EASYEDIT={where} python -m pytest tests/test_easyedit_recipe.py")
EOF
