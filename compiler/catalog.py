"""What the compiler knows about builtin UDFs and sources without importing the runtime.

`BUILTINS` is derived, not written here: every builtin declares itself beside its body with the
same `@udf(name="image.dhash", ...)` a user UDF uses, and the compiler finds the modules of
`vlmspec.runtime.udfs` (located, never imported) and reads those declarations from their source,
once per process. Adding a builtin touches one file. Also here: the model facts a plan needs and
the schemas of sources known before ingest.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .fingerprint import code_hash
from .memory import TextShape
from .params import Param, defaults, parse_decls, render_template
from .udf import UdfLookupError, UdfSource, positional_names, read_declarations

BUILTIN_PACKAGE = "vlmspec.runtime.udfs"


@dataclass(frozen=True)
class ModelFacts:
    """What the compiler must know about the model without loading it (filled by the runtime)."""

    id: str
    revision: str
    hidden_size: int
    """Width of merged vision tokens (the language model's hidden size for Qwen2.5-VL)."""
    processor_hash: str = ""
    """Hash of the processor/tokenizer/chat-template config that shapes cached columns."""
    patch_size: int = 14
    merge_size: int = 2
    text: TextShape | None = None
    """The language model's shape, for the training-memory estimate (None: unknown offline)."""


@dataclass(frozen=True)
class Slot:
    """One positional input of a UDF and the Arrow types it accepts (see `types.accepts`)."""

    name: str
    accepts: str
    default: str


@dataclass(frozen=True)
class UdfSignature:
    """A builtin as its `@udf(...)` declares it."""

    name: str
    impl: str
    """`module:attr` of the implementation, imported at apply time."""
    file: str
    """Its source file (read, never imported, by the compiler)."""
    slots: tuple[Slot, ...]
    output: str
    """Output type, a template over params and model facts (`params.render_template`)."""
    version: str
    """What the fingerprint hashes for the code: bumped by hand when outputs change."""
    code: str
    """Hash of the body as it is now (`fingerprint.code_hash`, the declaration left out); the lock
    test compares it with tests/golden/builtins.txt so a body edit cannot slip past `version`."""
    shape: str = ""
    """Plan shape template, e.g. `fp16[{image_tokens}x{hidden_size}]` (empty: derive from the type)."""
    params: Mapping[str, Param] = field(default_factory=dict)
    tuning: Mapping[str, Param] = field(default_factory=dict)
    """Speed knobs a column may set under `tuning:` (not fingerprinted)."""
    batch_size: int = 1024
    uses_model: bool = False
    gpu: bool = False
    parallel: bool = False
    """Worth spreading over worker processes (pixel work); vectorised Arrow UDFs are not."""
    doc: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """Declared parameter defaults (they join the column's params and its fingerprint)."""
        return defaults(self.params)

    def output_type(self, names: Mapping[str, Any]) -> str:
        """The output type for these params and model facts (raises ValueError on a bad template)."""
        return render_template(self.output, names)


# Columns of the embedded synthetic source (runtime/sources/synthetic.py asserts it matches):
# the real `lance-format/textvqa-lance` schema minus the CLIP embedding columns.
SYNTHETIC_SCHEMA: dict[str, str] = {
    "id": "int64",
    "image": "large_binary",
    "image_id": "string",
    "question_id": "string",
    "question": "string",
    "answers": "list<item: string>",
    "answer": "string",
    "ocr_tokens": "list<item: string>",
    "image_classes": "list<item: string>",
    "set_name": "string",
}

# Sources whose schema is known before ingest (so plans are fully checked offline).
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    "lance-format/textvqa-lance": {
        **SYNTHETIC_SCHEMA,
        "image_emb": "fixed_size_list<item: float>[512]",
        "question_emb": "fixed_size_list<item: float>[512]",
    },
}


def signature_of(src: UdfSource, impl: str) -> UdfSignature:
    """A builtin's signature from its `@udf(...)` declaration; raises UdfLookupError if it is incomplete."""
    d, where = src.declared, f"{src.file}:{src.node.lineno} `{src.node.name}`"
    missing = [k for k in ("name", "output", "version") if not isinstance(d.get(k), str) or not d.get(k)]
    if missing:
        raise UdfLookupError(f"builtin {where}: `@udf(...)` must declare {', '.join(missing)} (as text)")
    inputs, accepts = list(d.get("inputs") or ()), list(d.get("accepts") or ())
    if not inputs or len(inputs) != len(accepts):
        raise UdfLookupError(f"builtin {where}: `inputs` and `accepts` must list the same inputs, in order")
    # A slot is named after the positional parameter it fills (messages say `takes 1 input (images)`).
    names = positional_names(src.node)
    slots = tuple(Slot(names[i] if i < len(names) else f"input{i}", a, c) for i, (c, a) in enumerate(zip(inputs, accepts)))
    try:
        params, tuning = parse_decls(d.get("params") or {}, "params"), parse_decls(d.get("tuning") or {}, "tuning")
    except ValueError as e:
        raise UdfLookupError(f"builtin {where}: {e}") from None
    if any(not p.has_default for p in params.values()):
        raise UdfLookupError(f"builtin {where}: every param needs a `default`")
    batch = bool(d.get("batch", True))
    return UdfSignature(
        name=d["name"], impl=impl, file=str(src.file), slots=slots, output=d["output"], version=d["version"],
        code=code_hash(src.module, src.node, with_decorators=False), shape=d.get("shape") or "",
        params=params, tuning=tuning, batch_size=int(d.get("batch_size") or 1024), uses_model=bool(d.get("model")),
        gpu=bool(d.get("gpu")), parallel=bool(d["parallel"] if d.get("parallel") is not None else not batch),
        doc=(ast.get_docstring(src.node) or "").split("\n")[0])


@functools.cache
def builtin_signatures() -> dict[str, UdfSignature]:
    """Every builtin, read from the source of `vlmspec.runtime.udfs` (cached for the process)."""
    try:  # finds the package's folder; imports only the parents, whose __init__ is a docstring
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UdfLookupError(f"cannot find the builtin UDFs (`{BUILTIN_PACKAGE}`): is vlmspec installed?")
    out: dict[str, UdfSignature] = {}
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            for src in read_declarations(path):
                sig = signature_of(src, f"{BUILTIN_PACKAGE}.{path.stem}:{src.node.name}")
                if sig.name in out:
                    raise UdfLookupError(f"builtin `{sig.name}` is declared twice ({out[sig.name].impl}, {sig.impl})")
                out[sig.name] = sig
    return dict(sorted(out.items()))


class _Builtins(Mapping[str, UdfSignature]):
    """`BUILTINS`, read on first use: importing the compiler reads no runtime source. A broken
    install raises UdfLookupError from the first lookup (the compiler reports it)."""

    def __getitem__(self, name: str) -> UdfSignature:
        return builtin_signatures()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(builtin_signatures())

    def __len__(self) -> int:
        return len(builtin_signatures())


BUILTINS: Mapping[str, UdfSignature] = _Builtins()
