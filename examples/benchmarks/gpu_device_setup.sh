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
# The workplace image's packages carry no bytecode, and its site-packages may not be writable: every
# process compiled torch, transformers and peft from source (~10 s of a LoRA-change apply, py-spy).
# pip writes bytecode at install time; the same here, once, into a cache beside the unpacked deps
# (ignored, so a warm machine keeps it).
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=$PWD/.gpusite/pycache
mkdir -p .gpusite/site .gpusite/pkg/vlmspec
for t in .gpu/*.tar.xz; do
  [ -f "$t" ] || continue
  stamp=".gpusite/site/.unpacked-$(basename "$t" .tar.xz)"
  [ -f "$stamp" ] || { tar xJf "$t" -C .gpusite/site && touch "$stamp" && echo "unpacked $t"; }
done
# compileall's workers run under forkserver, which re-imports __main__: run it as a module (a script
# on stdin breaks the pool). Files already compiled are skipped: later calls only do what they unpacked.
t0=$(date +%s)
dirs=.gpusite/site
[ -f .gpusite/pycache/.image-compiled ] || dirs="$dirs $(python3 -c 'import site; print(" ".join(site.getsitepackages()))')"
python3 -m compileall -q -j 16 $dirs > /dev/null 2>&1; mkdir -p .gpusite/pycache && touch .gpusite/pycache/.image-compiled
echo "bytecode of $dirs in $(( $(date +%s) - t0 )) s"
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
