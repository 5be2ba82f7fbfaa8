# Source this on a bare GPU machine (the workplace's CUDA image: torch, transformers, peft, pyarrow,
# typer, rich, but no vlmspec, pydantic, pylance, lancedb or bitsandbytes) from the repository root,
# before `python3 -m vlmspec.runtime.cli bench ...` or `python3 -m pytest ...` (the CLI module runs as
# a script, so no console script is needed).
#
# The dependencies travel as the tarballs `../shared/tools/pack-gpu-deps.sh` makes in the git-ignored
# .gpu/ folder (pylance, lancedb, small: pydantic, bitsandbytes, imagehash, sqlglot, ...), plus
# .gpu/extra.tar.xz where present (datasets, pandas, pynvml, pytest, hypothesis). One call carries at
# most 64 MiB, so carry one or two tarballs per call, back to back on a warm machine: each call
# unpacks whatever tarball it carried into .gpusite/site (ignored, and outside .gpu/, whose contents
# each call replaces with what it carries, so it survives on a warm machine).
export PYTHONUNBUFFERED=1 LANCE_LOG=error
mkdir -p .gpusite/site .gpusite/pkg/vlmspec
for t in .gpu/*.tar.xz; do
  [ -f "$t" ] || continue
  stamp=".gpusite/site/.unpacked-$(basename "$t" .tar.xz)"
  [ -f "$stamp" ] || { tar xJf "$t" -C .gpusite/site && touch "$stamp" && echo "unpacked $t"; }
done
ln -sfn "$PWD/compiler" .gpusite/pkg/vlmspec/compiler
ln -sfn "$PWD/runtime" .gpusite/pkg/vlmspec/runtime
export PYTHONPATH=$PWD/.gpusite/pkg:$PWD/.gpusite/site${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import importlib, platform
v = {"python": platform.python_version()}
for m in ("torch", "transformers", "peft", "pyarrow", "pydantic", "lance", "lancedb", "bitsandbytes",
          "datasets", "pynvml", "pytest"):
    try:
        v[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        v[m] = f"missing ({type(e).__name__})"
import torch
v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("device setup:", v, flush=True)
PY
