"""Compile a loaded spec into an ordered graph of columns and steps, with fingerprints.

Checks meaning (unknown columns with did-you-mean, cycles naming the path, producer/consumer type
mismatches, UDFs that cannot be found, training that would stale the cache) and collects every
problem before raising one `CompileError`. Pure: reads UDF source files, never tables or models.
"""

from __future__ import annotations

import graphlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .catalog import BUILTINS, SYNTHETIC_SCHEMA, ModelFacts, UdfSignature
from .errors import CompileError, Location, Problem, did_you_mean
from .fingerprint import ENGINE_VERSION, code_hash, digest
from .model import ColumnSpec, Spec
from .params import Param, check_values, defaults, parse_decls, render_template
from .paths import shown
from .state import RESERVED, TableState
from .types import TypeSyntaxError, accepts, parse_type
from .udf import UdfLookupError, find_module_file, read_udf
from .where import check_where

STAGES = ("ingest", "curate", "split", "train", "eval")
# Modules of the vision tower and merger: training them would make cached hiddens stale.
VISION_MODULE_WORDS = ("visual", "merger", "patch_embed", "qkv", "blocks")


@dataclass(frozen=True)
class ColumnNode:
    """One derived column, fully resolved."""

    name: str
    tier: str
    udf: str
    impl: str
    """`module:attr` to import at apply time."""
    impl_file: str
    """Source file of the implementation (user UDFs are imported from here)."""
    inputs: tuple[str, ...]
    params: Mapping[str, Any]
    output: str
    batch_size: int
    on_error: str
    gpus: float
    cpus: float
    uses_model: bool
    batch: bool
    parallel: bool
    """Spread over worker processes (CPU-heavy, e.g. image decoding)."""
    fingerprint: str
    recipe: Mapping[str, Any]
    path: str
    shape: str = ""
    """Human shape for plans, e.g. `fp16[400x2048]` (empty: derive from the type)."""
    tuning: Mapping[str, Any] = field(default_factory=dict)
    """The UDF's declared speed knobs, the column's `tuning:` over their defaults; not fingerprinted."""


@dataclass(frozen=True)
class StageNode:
    """A step after the columns (or ingest before them), with what it reads."""

    name: str
    fingerprint: str
    recipe: Mapping[str, Any]
    reads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    file: str
    spec_hash: str
    raw: Mapping[str, str]
    """Raw (source) column name -> canonical type, as far as known."""
    columns: tuple[ColumnNode, ...]
    """Derived columns in dependency order."""
    stages: tuple[StageNode, ...]
    facts: ModelFacts | None = None
    warnings: tuple[str, ...] = ()

    def column(self, name: str) -> ColumnNode | None:
        return next((c for c in self.columns if c.name == name), None)

    def stage(self, name: str) -> StageNode | None:
        return next((s for s in self.stages if s.name == name), None)

    def types(self) -> dict[str, str]:
        return {**self.raw, **{c.name: c.output for c in self.columns}}


class _Compiler:
    def __init__(self, spec: Spec, file: str, spec_hash: str, state: TableState,
                 facts: ModelFacts | None, locate, spec_dir: Path | None, written: Mapping[str, str] | None = None):
        self.spec, self.file, self.spec_hash, self.state = spec, file, spec_hash, state
        self.written = written
        self.facts, self.locate, self.spec_dir = facts, locate, spec_dir
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        # Rows the table will hold once ingest has run: steps are fingerprinted against it.
        self.expected_rows = max(state.rows, state.source_rows or 0)

    def problem(self, path: str, what: str, fix: str = "") -> None:
        self.problems.append(Problem(what, path, self.locate(path), fix))

    # -- raw columns ------------------------------------------------------------------------
    def raw_columns(self) -> dict[str, str] | None:
        derived = {n for _, n, _ in self.spec.features.columns()}
        if self.state.exists:
            return {c.name: c.type for c in self.state.columns if c.name not in derived and not c.is_derived}
        ingest = self.spec.source.ingest
        if ingest is None:
            self.problem("source.table", f"table `{self.spec.source.table}` does not exist and `source.ingest` is not set",
                         "Add `ingest:` (e.g. `ingest: {from: synthetic}`) or point `table` at an existing Lance table")
            return None
        if ingest.kind == "synthetic":
            return dict(SYNTHETIC_SCHEMA)
        if self.state.source_schema is not None:
            return dict(self.state.source_schema)
        self.warnings.append(f"columns of the {ingest.kind} source are not known before ingest; "
                             "column references are checked at apply time")
        return None

    # -- UDF resolution ---------------------------------------------------------------------
    def resolve(self, tier: str, name: str, col: ColumnSpec) -> dict[str, Any] | None:
        path = f"features.{tier}.{name}"
        try:  # params are fingerprinted and stored as JSON: mixed key types or inf would crash later
            json.dumps(col.params, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            self.problem(f"{path}.params", f"params must be plain values with text keys and finite numbers ({e})",
                         "Quote the keys; use numbers, strings, booleans and lists")
            return None
        if ":" in col.udf:
            return self.resolve_user(path, col)
        try:
            sig = BUILTINS.get(col.udf)
        except UdfLookupError as e:  # a broken install, not a user mistake, but say it plainly
            self.problem(f"{path}.udf", str(e))
            return None
        if sig is None:
            self.problem(f"{path}.udf", f"unknown builtin UDF `{col.udf}`",
                         did_you_mean(col.udf, BUILTINS) or f"Builtins: {', '.join(sorted(BUILTINS))}; "
                         "or name a user UDF as `module:function`")
            return None
        return self.resolve_builtin(path, col, sig)

    def check_declared(self, path: str, udf: str, decls: Mapping[str, Param], given: Mapping[str, Any],
                       section: str) -> dict[str, Any] | None:
        """`given` (a column's `params` or `tuning`) checked against what the UDF declares; None on a
        bad value (each problem is located at its key)."""
        kind = "parameter" if section == "params" else "tuning knob"
        values, problems = check_values(decls, given, udf, kind)
        for key, what, fix in problems:
            self.problem(f"{path}.{section}.{key}", what, fix)
        return None if any(k in decls for k, _, _ in problems) else values

    def resolve_builtin(self, path: str, col: ColumnSpec, sig: UdfSignature) -> dict[str, Any] | None:
        checked = self.check_declared(path, sig.name, sig.params, col.params, "params")
        tuning = self.check_declared(path, sig.name, sig.tuning, col.tuning, "tuning")
        inputs = tuple(col.inputs) if col.inputs is not None else tuple(s.default for s in sig.slots)
        if len(inputs) != len(sig.slots):
            self.problem(f"{path}.inputs", f"`{sig.name}` takes {len(sig.slots)} input(s) "
                         f"({', '.join(s.name for s in sig.slots)}), got {len(inputs)}")
            return None
        if checked is None or tuning is None:
            return None
        # The recipe keeps the values as written (a rendered `"512"` stays text, as it always was:
        # fingerprints must not move); templates see them coerced.
        params = {**sig.defaults, **col.params}
        names: dict[str, Any] = {**sig.defaults, **checked}
        recipe_model = None
        if sig.uses_model:
            if self.spec.model is None:
                self.problem(f"{path}.udf", f"`{sig.name}` needs a `model` section")
                return None
            if self.facts is None:
                self.problem("model.id", f"cannot read the config of model `{self.spec.model.id}`",
                             "Set `model.hidden_size`, or make the model available locally")
                return None
            m, f = self.spec.model, self.facts
            names.update(image_px=m.image_px, image_tokens=m.image_tokens, hidden_size=f.hidden_size,
                         patch_size=f.patch_size, merge_size=f.merge_size)
            recipe_model = {"id": m.id, "revision": m.revision, "image_px": m.image_px,
                            "processor": f.processor_hash, "hidden": f.hidden_size}
        if col.output and not sig.uses_model:
            self.warnings.append(f"`{path}.output` is ignored: `{sig.name}` declares its output type")
        try:
            output, shape = sig.output_type(names), render_template(sig.shape, names)
        except ValueError as e:  # the builtin's declaration is broken: not the user's mistake
            self.problem(f"{path}.udf", f"`{sig.name}` declares a bad output type or shape: {e}")
            return None
        return dict(udf=sig.name, impl=sig.impl, impl_file=sig.file, inputs=inputs, params=params,
                    output=output, batch_size=col.batch_size or sig.batch_size, uses_model=sig.uses_model,
                    gpu=sig.gpu, batch=True, parallel=sig.parallel, code=sig.version,
                    slots=[s.accepts for s in sig.slots], model=recipe_model, shape=shape,
                    tuning={**defaults(sig.tuning), **tuning})

    def resolve_user(self, path: str, col: ColumnSpec) -> dict[str, Any] | None:
        module, _, func = col.udf.partition(":")
        try:
            src = read_udf(module, func, self.spec_dir)
        except UdfLookupError as e:
            self.problem(f"{path}.udf", str(e), "Put the module next to the spec or install it")
            return None
        decl = src.declared
        builtin_only = [k for k in ("name", "shape", "model", "gpu") if decl.get(k)]
        if builtin_only:  # said, not silently dropped: a user UDF is named by `module:function`
            self.warnings.append(f"`{path}`: `@udf({', '.join(f'{k}=' for k in builtin_only)})` on `{col.udf}` "
                                 "only applies to builtins and is ignored")
        output = col.output or decl.get("output")
        if output is None:
            self.problem(f"{path}.output", f"`{col.udf}` declares no output type",
                         "Add `output=` to its @udf(...) or `output:` to the column")
            return None
        try:
            output = str(parse_type(output))
        except TypeSyntaxError as e:
            self.problem(f"{path}.output", f"`{col.udf}` declares a bad output type: {e}")
            return None
        inputs = tuple(col.inputs if col.inputs is not None else (decl.get("inputs") or ()))
        if not inputs:
            self.problem(f"{path}.inputs", f"`{col.udf}` declares no inputs", "List its input columns under `inputs:`")
            return None
        accepts = list(decl.get("accepts") or ["any"] * len(inputs))
        if len(accepts) != len(inputs):
            self.problem(f"{path}.inputs", f"`{col.udf}` takes {len(accepts)} input(s), got {len(inputs)}")
            return None
        try:
            pdecl, tdecl = parse_decls(decl.get("params") or {}, "params"), parse_decls(decl.get("tuning") or {}, "tuning")
        except ValueError as e:
            self.problem(f"{path}.udf", f"`{col.udf}` has a bad `@udf` declaration: {e}")
            return None
        params = dict(col.params)
        if decl.get("params") is not None:  # declared: checked, and declared defaults fill in
            if self.check_declared(path, col.udf, pdecl, col.params, "params") is None:
                return None
            params = {**defaults(pdecl), **params}
        tuning = self.check_declared(path, col.udf, tdecl, col.tuning, "tuning")
        if tuning is None:
            return None
        version = decl.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            self.problem(f"{path}.udf", f"`{col.udf}` declares `version={version!r}`", "Use a string such as \"2\"")
            return None
        # A declared version stands for the code (as a builtin's does); otherwise the source is hashed.
        code = str(version) if version is not None else code_hash(src.module, src.node)
        return dict(udf=col.udf, impl=col.udf, impl_file=str(src.file), inputs=inputs, params=params,
                    output=output, batch_size=col.batch_size or decl.get("batch_size") or 1024,
                    uses_model=False, gpu=False, batch=bool(decl.get("batch", True)),
                    parallel=bool(decl["parallel"] if decl.get("parallel") is not None else not decl.get("batch", True)),
                    code=code, slots=accepts, model=None, shape="", tuning={**defaults(tdecl), **tuning})

    # -- graph ------------------------------------------------------------------------------
    def columns(self, raw: dict[str, str] | None) -> tuple[ColumnNode, ...] | None:
        specs = {n: (t, c) for t, n, c in self.spec.features.columns()}
        resolved = {n: r for n, (t, c) in specs.items() if (r := self.resolve(t, n, c)) is not None}
        for n in specs:
            if RESERVED in n:  # such names are the shadow and retired fields of a recompute
                self.problem(f"features.{specs[n][0]}.{n}", f"column names may not contain `{RESERVED}`",
                             "Rename the column")
            if raw is not None and n in raw:
                self.problem(f"features.{specs[n][0]}.{n}", f"`{n}` is a raw column of the source",
                             "Give the derived column another name; raw columns are never modified")
        known = set(specs) | set(raw or ())
        graph: dict[str, set[str]] = {}
        for n, r in resolved.items():
            graph[n] = set()
            for i, inp in enumerate(r["inputs"]):
                ipath = f"features.{specs[n][0]}.{n}.inputs[{i}]"
                if inp in specs:
                    graph[n].add(inp)
                elif raw is not None and inp not in known:
                    self.problem(ipath, f"unknown column `{inp}`",
                                 did_you_mean(inp, known) or f"Known columns: {', '.join(sorted(known))}")
        try:
            order = _stable_order(graph, list(specs))
        except graphlib.CycleError as e:
            cycle = e.args[1]
            self.problem(f"features.{specs[cycle[0]][0]}.{cycle[0]}.inputs",
                         "dependency cycle: " + " -> ".join(f"`{c}`" for c in reversed(cycle)),
                         "Break the cycle: a column cannot depend on itself")
            return None
        types = dict(raw or {})
        fps: dict[str, str] = {}
        nodes = []
        for n in order:
            if n not in resolved:
                continue
            tier, col = specs[n]
            r = resolved[n]
            ins = []
            for i, (inp, pattern) in enumerate(zip(r["inputs"], r["slots"])):
                t = types.get(inp)
                if t is not None and not _accepts(pattern, t):
                    self.problem(f"features.{tier}.{n}.inputs[{i}]",
                                 f"`{r['udf']}` expects {pattern} input but `{inp}` is `{t}`",
                                 "Pick a column of a matching type")
                ins.append({"column": inp, "fp": fps.get(inp, f"raw:{t}")})
            recipe = {"udf": r["udf"], "code": r["code"], "params": r["params"], "output": r["output"],
                      "inputs": ins, "model": r["model"], "engine": ENGINE_VERSION}
            fp = digest(recipe)
            fps[n], types[n] = fp, r["output"]
            nodes.append(ColumnNode(
                name=n, tier=tier, udf=r["udf"], impl=r["impl"], impl_file=r["impl_file"], inputs=r["inputs"],
                params=r["params"], output=r["output"], batch_size=r["batch_size"], on_error=col.on_error,
                gpus=col.resources.gpus, cpus=col.resources.cpus,
                uses_model=r["uses_model"], batch=r["batch"], parallel=r["parallel"], fingerprint=fp, recipe=recipe,
                path=f"features.{tier}.{n}", shape=r["shape"], tuning=r["tuning"]))
        return tuple(nodes)

    # -- stages -----------------------------------------------------------------------------
    def stages(self, types: dict[str, str], fps: dict[str, str], checked: bool) -> tuple[StageNode, ...]:
        spec, out = self.spec, []

        def need(path: str, column: str) -> str:
            if checked and column not in types:
                self.problem(path, f"unknown column `{column}`", did_you_mean(column, types))
            return fps.get(column, f"raw:{types.get(column)}")

        ingest = spec.source.ingest
        if ingest is not None:
            body = ingest.model_dump(mode="json", by_alias=True, exclude={"limit", "rows"})
            out.append(StageNode("ingest", digest({"ingest": body, "key": spec.source.key}), {"ingest": body}))
        cur = spec.curation
        curate_fp = ""
        if cur is not None or spec.train is not None:
            reads, recipe = [], {"where": None, "dedup": None}
            if cur is not None:
                recipe = cur.model_dump(mode="json", exclude={"name"})
                if cur.where:  # one boolean expression, typed against the columns known here
                    check = check_where(cur.where, types)
                    for what, fix in check.problems:
                        self.problem("curation.where", what, fix)
                    reads += check.reads
                if cur.dedup is not None:
                    reads.append(cur.dedup.column)
                    t = types.get(cur.dedup.column)
                    if t is not None and t not in ("uint64", "int64"):
                        self.problem("curation.dedup.column", f"dedup needs a 64-bit hash column, `{cur.dedup.column}` is `{t}`",
                                     "Use an `image.dhash` or `image.phash` column")
            recipe["inputs"] = {c: need("curation.where" if c != getattr(cur.dedup, "column", None) else "curation.dedup.column", c)
                                for c in sorted(set(reads))}
            recipe["rows"] = self.expected_rows
            # Rows a UDF may null under `on_error: null` in a column training reads are left out of
            # the slice: which rows those are moves with those columns' fingerprints.
            nullable = self.nullable_train_columns(fps)
            if nullable:
                recipe["leaves_out"] = nullable
            curate_fp = digest(recipe)
            out.append(StageNode("curate", curate_fp, recipe, tuple(sorted(set(reads)))))
        split_fp = ""
        if spec.split is not None:
            sp = spec.split
            recipe = sp.model_dump(mode="json")
            recipe["inputs"] = {sp.by: need("split.by", sp.by)} if sp.table is None else {}
            recipe["curate"] = curate_fp if sp.curated else ""
            recipe["rows"] = self.expected_rows
            split_fp = digest(recipe)
            out.append(StageNode("split", split_fp, recipe, (sp.by,) if sp.table is None else ()))
        train_fp = ""
        if spec.train is not None:
            tr = spec.train
            self.check_train(types)
            recipe = tr.model_dump(mode="json", exclude={"output_dir", "log_every", "num_workers",
                                                         "loader_threads", "checkpoint_every", "compile",
                                                         "report_to", "gradient_checkpointing", "fuse_accum"})
            recipe["inputs"] = {tr.hiddens: need("train.hiddens", tr.hiddens), tr.tokens: need("train.tokens", tr.tokens)}
            recipe["model"] = {"id": spec.model.id, "revision": spec.model.revision}
            recipe["curate"], recipe["split"] = curate_fp, split_fp
            train_fp = digest(recipe)
            out.append(StageNode("train", train_fp, recipe, (tr.hiddens, tr.tokens)))
        if spec.eval is not None:
            ev = spec.eval
            recipe = ev.model_dump(mode="json", exclude={"output_dir", "batch_size"})
            if recipe["limit"] == "all":  # the same questions as `null`, so the same fingerprint
                recipe["limit"] = None
            recipe["train"], recipe["split"] = train_fp, split_fp
            recipe["model"] = ({"id": spec.model.id, "revision": spec.model.revision,
                                "image_px": spec.model.image_px} if spec.model else None)
            for c in ("image", "question", "answers"):
                need("eval", c)
            out.append(StageNode("eval", digest(recipe), recipe, ("image", "question", "answers")))
        return tuple(out)

    def nullable_train_columns(self, fps: dict[str, str]) -> dict[str, str]:
        """Columns training reads that may hold nulls by a recorded row error, with fingerprints."""
        tr = self.spec.train
        if tr is None:
            return {}
        cols = {n: c for _, n, c in self.spec.features.columns()}
        return {n: fps.get(n, "") for n in (tr.hiddens, tr.tokens) if n in cols and cols[n].on_error == "null"}

    def check_train(self, types: dict[str, str]) -> None:
        tr = self.spec.train
        for i, t in enumerate(tr.lora.targets):
            if any(w in t for w in VISION_MODULE_WORDS):
                self.problem(f"train.lora.targets[{i}]",
                             f"`{t}` adapts the vision tower or merger, but training reads cached hiddens",
                             "The cache would be stale by construction: target language-model modules "
                             "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
        for i, t in enumerate(tr.lora.modules_to_save):
            if any(w in t for w in VISION_MODULE_WORDS):
                self.problem(f"train.lora.modules_to_save[{i}]",
                             f"`{t}` trains part of the vision tower or merger, but training reads cached hiddens",
                             "The cache would be stale by construction: remove it (only language-model "
                             "modules can be trained from cached hiddens)")
        if tr.quant.bits == 4 and tr.gradient_checkpointing is True and tr.compile == "layers":
            # Measured on an H200 at the 3B shape: the loss turned NaN by step 30 (and the run was
            # recorded as trained before the finite-loss guard existed).
            self.problem("train.compile", "`compile: layers` with 4-bit QLoRA and `gradient_checkpointing: true` "
                         "diverges (NaN loss, measured at the 3B shape)",
                         "Use `compile: graph` or `compile: none`, or `gradient_checkpointing: false`")
        for path, col, udf in (("train.hiddens", tr.hiddens, "vlm.vision_tower"), ("train.tokens", tr.tokens, "vlm.sft_tokens")):
            node = self.spec.features.columns()
            producer = next((c.udf for _, n, c in node if n == col), None)
            if producer is not None and producer != udf:
                self.problem(path, f"`{col}` is made by `{producer}`, training needs a `{udf}` column")

    # -- trust ------------------------------------------------------------------------------
    def check_trust(self) -> None:
        """Warnings for what a reviewer of an untrusted spec must see before `apply` runs it."""
        model = self.spec.model
        if model is not None and model.trust_remote_code:
            self.warnings.append(f"`model.trust_remote_code` is on: loading `{model.id}` runs Python code "
                                 "shipped with the model; keep it off unless you trust that repository")
        outputs = [("source.table", self.spec.source.table)]
        if self.spec.train is not None:
            outputs.append(("train.output_dir", self.spec.train.output_dir))
        if self.spec.eval is not None:
            outputs.append(("eval.output_dir", self.spec.eval.output_dir))
        for path, value in outputs:
            # Resolved paths have no `..` left: judge what was written, and where it lands.
            text = value if self.written is None else self.written.get(path)
            if value and text and ".." in text.replace("\\", "/").split("/") and not _under_cwd(value):
                self.warnings.append(f"`{path}` `{text}` has a `..` segment: it writes to `{shown(value)}`, outside "
                                     "the current directory; check that is intended")

    def run(self) -> Compiled:
        self.check_trust()
        raw = self.raw_columns()
        cols = self.columns(raw)
        checked = raw is not None and cols is not None  # after a cycle, references can't be judged
        cols = cols or ()
        types = {**(raw or {}), **{c.name: c.output for c in cols}}
        fps = {c.name: c.fingerprint for c in cols}
        stages = self.stages(types, fps, checked=checked)
        if self.problems:
            raise CompileError(self.problems)
        return Compiled(self.spec, self.file, self.spec_hash, raw or {}, cols, stages, self.facts,
                        tuple(self.warnings))


def _stable_order(graph: dict[str, set[str]], declared: list[str]) -> list[str]:
    """Topological order that keeps declaration order wherever dependencies allow (stable plans)."""
    ts = graphlib.TopologicalSorter(graph)
    ts.prepare()  # raises CycleError naming the cycle
    rank = {n: i for i, n in enumerate(declared)}
    order: list[str] = []
    ready = sorted(ts.get_ready(), key=lambda n: rank.get(n, -1))
    while ready:
        n = ready.pop(0)
        order.append(n)
        ts.done(n)
        ready = sorted(set(ready) | set(ts.get_ready()), key=lambda n: rank.get(n, -1))
    return order


def _accepts(pattern: str, actual: str) -> bool:
    try:
        return accepts(pattern, parse_type(actual))
    except TypeSyntaxError:
        return True  # a stored type we cannot parse is not the user's mistake; let apply decide


def compile_spec(spec: Spec, state: TableState, *, file: str = "<spec>", spec_hash: str = "",
                 facts: ModelFacts | None = None, locate=None, spec_dir: Path | None = None,
                 written: Mapping[str, str] | None = None) -> Compiled:
    """Resolve UDFs, order columns, fingerprint everything. Raises CompileError with all problems.

    `written`: path fields as the spec wrote them before load resolved them (`LoadedSpec.written`);
    None when the spec's paths were never resolved."""
    locate = locate or (lambda path: Location(file))
    return _Compiler(spec, file, spec_hash, state, facts, locate, spec_dir, written).run()


def _under_cwd(path: str) -> bool:
    rel = os.path.relpath(os.path.abspath(path))
    return rel != ".." and not rel.startswith(".." + os.sep)
