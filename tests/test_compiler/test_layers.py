"""The compiler is pure: importing and planning with it pulls in no lance, pyarrow, torch or rich."""

import subprocess
import sys

from helpers import ROOT


def test_compiler_imports_no_heavy_libraries():
    code = (
        "import sys, vlmspec.compiler.load, vlmspec.compiler.compile, vlmspec.compiler.plan, "
        "vlmspec.compiler.render, vlmspec.compiler.udf\n"
        "from vlmspec.compiler.load import load_spec\n"
        "from vlmspec.compiler.compile import compile_spec\n"
        "from vlmspec.compiler.plan import build_plan\n"
        "from vlmspec.compiler.state import TableState\n"
        "l = load_spec('tests/cases/evolve/noop/after/spec.yaml')\n"
        "st = TableState(uri='x', source_rows=500)\n"
        "build_plan(compile_spec(l.spec, st, spec_dir=__import__('pathlib').Path('tests/cases/evolve/noop/after')), st)\n"
        "bad = sorted(m for m in ('lance', 'lancedb', 'pyarrow', 'torch', 'transformers', 'rich', 'typer', 'PIL')"
        " if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
