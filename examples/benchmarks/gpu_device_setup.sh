# Source this on a bare GPU machine (the workplace's CUDA image: torch, transformers, peft, pyarrow,
# but no vlmspec, pydantic, pylance or bitsandbytes) from the repository root, before
# `python3 -m vlmspec.runtime.cli bench gpu ...` / `python3 -m vlmspec.runtime.cli bench reads ...`
# (the CLI module runs as a script, so no console script is needed; typer and rich are in the image).
# Wheels travel in the git-ignored .gpu/ folder: .gpu/whl (pydantic, sqlglot, lance-namespace),
# .gpu/pylance.tar.xz (pylance unpacked, xz) and .gpu/bnb*/*.whl (bitsandbytes; the first one found), as available.
export PYTHONUNBUFFERED=1 LANCE_LOG=error
mkdir -p /tmp/site /tmp/pkg/vlmspec
ln -sfn "$PWD/compiler" /tmp/pkg/vlmspec/compiler
ln -sfn "$PWD/runtime" /tmp/pkg/vlmspec/runtime
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --find-links .gpu/whl --target /tmp/site \
    pydantic pydantic-core annotated-types typing-inspection sqlglot lance-namespace lance-namespace-urllib3-client \
    2>&1 | grep -v -i warning | tail -3
fi
if [ -f .gpu/pylance.tar.xz ] && [ ! -f /tmp/site/lance/__init__.py ]; then tar xJf .gpu/pylance.tar.xz -C /tmp/site; fi
if ls .gpu/bnb*/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/bitsandbytes ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $(ls .gpu/bnb*/*.whl | head -1) 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import importlib, platform
v = {"python": platform.python_version()}
for m in ("torch", "transformers", "peft", "pyarrow", "pydantic", "lance", "bitsandbytes", "pynvml"):
    try:
        v[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        v[m] = f"missing ({type(e).__name__})"
import torch
v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("device setup:", v, flush=True)
PY
