"""`vlmspec bench fuzz`: thousands of hostile specs through load and compile; only `VlmspecError`s may come out.

Five families of cases, drawn from one seeded `random.Random` (the same generators drive the
hypothesis tests in tests/test_compiler/test_load_fuzz.py):
- `text`: arbitrary and syntax-heavy text (YAML and jinja punctuation, template payloads);
- `bytes`: arbitrary bytes read from a file (not UTF-8, NULs, BOMs);
- `yaml`: random YAML documents built from spec keys and odd values;
- `mutated`: a valid spec with keys dropped or replaced by random values;
- `valid_shape`: specs that pass the schema but mean nonsense (unknown columns and UDFs, cycles,
  bad types and params, broken SQL), compiled against an empty table.
Any other exception is a bug: its type, message and case are recorded (the target is 0).
"""

from __future__ import annotations

import copy
import random
import string
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

from .common import Results, load

FAMILIES = ("text", "bytes", "yaml", "mutated", "valid_shape")

SPEC_KEYS = ["name", "vars", "source", "table", "ingest", "from", "synthetic", "parquet", "rows", "model", "id",
             "image_px", "features", "tier1", "tier2", "tier3", "udf", "inputs", "params", "output", "on_error",
             "curation", "where", "dedup", "split", "by", "fraction", "train", "lora", "optim", "steps", "eval"]
TEMPLATE_BITS = ["{{ name }}", "{{ rows }}", "{{ nope }}", "{% if rows %}", "{% endif %}", "{{", "}}", "{#",
                 "{% for x in range(3) %}{{ x }}{% endfor %}", "{{ ''.__class__ }}", "{{ 1/0 }}", "{{ rows * 'a' }}",
                 "{% raw %}", "{{ self.__init__.__globals__ }}", "{% include 'x' %}", "{{ 9 ** 9 ** 9 }}",
                 "&a", "*a", "<<: *a", "!!python/object:os.system", "- ", ": ", "? ", "|", ">-", "%YAML 1.1"]
RAW = ["id", "image", "image_id", "question_id", "question", "answers", "answer", "ocr_tokens", "image_classes",
       "set_name"]
UDFS = ["text.length", "text.words", "text.question_type", "text.count", "image.dhash", "image.phash", "image.size",
        "vlm.vision_tower", "vlm.sft_tokens", "text.nope", "udfs:good", "udfs:undecorated", "udfs:missing",
        "udfs:literal", "broken:fn", "nomodule:fn", "os:system"]
TYPES = ["int32", "uint64", "string", "list<string>", "list<item: string>", "struct<a: int32, b: list<float>>",
         "fixed_size_list<item: halffloat>[8]", "float16", "bool", "large_binary", "map<string, int32>",
         "int33", "list<", "decimal(3,2)", "dictionary<values=string, indices=int8>"]
SQL = ["ocr_token_count >= quantile(ocr_token_count, 0.75)", "question_length > 3", "x >", "quantile(x, 2) > 1",
       "`weird col` > 1", "1 = 1", "a IN (1, 2", "'; DROP TABLE t; --", "nope(question)", "dhash IS NOT NULL",
       "question LIKE '%how%' AND answer_words > 1", "quantile(question, 0.5) < quantile(dhash, 0.1)", ""]
NAMES = RAW + ["question_length", "answer_words", "dhash", "phash", "vision_tower_hiddens", "sft_tokens", "n", "m",
               "questoin", "_x", "image_size"]

# The user module the cases name: importing it exits the process, so a compile that imports user
# code ends the run loudly instead of passing.
USER_UDFS = '''\
from vlmspec.compiler.udf import udf

raise SystemExit("the compiler must never import a user module")


@udf(output="int32", inputs=["question"])
def good(question):
    return question


def undecorated(x):
    return x


@udf(output=f"int{32}", inputs=["question"])
def literal(question):
    return question
'''

VALID = {
    "name": "fuzz", "vars": {"rows": 64, "tag": "v1"},
    "source": {"table": "data/{{ name }}-{{ tag }}.lance",
               "ingest": {"from": "synthetic", "rows": "{{ rows }}", "image_px": 64}, "rows_per_fragment": 32},
    "model": {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": 56},
    "features": {"tier1": {"question_length": {"udf": "text.length", "inputs": ["question"]},
                           "ocr_token_count": {"udf": "text.count", "inputs": ["ocr_tokens"]}},
                 "tier2": {"dhash": {"udf": "image.dhash", "inputs": ["image"]}},
                 "tier3": {"vision_tower_hiddens": {"udf": "vlm.vision_tower", "inputs": ["image"]},
                           "sft_tokens": {"udf": "vlm.sft_tokens", "params": {"max_tokens": 96}}}},
    "curation": {"where": "ocr_token_count >= quantile(ocr_token_count, 0.5)", "dedup": {"column": "dhash"}},
    "split": {"by": "image_id", "fraction": 0.2},
    "train": {"lora": {"r": 4, "targets": ["q_proj"]}, "optim": {"steps": 4}, "checkpoint_every": 2},
    "eval": {"limit": 8},
}


# --- generators (any `random.Random`, or hypothesis's `st.randoms()`) ------------------------------

def random_scalar(r: random.Random) -> Any:
    kind = r.randrange(9)
    if kind == 0:
        return None
    if kind == 1:
        return r.choice([True, False])
    if kind == 2:
        return r.choice([0, -1, 1, 7, 28, 56, 2**31, -(2**63), 10**30])
    if kind == 3:
        return r.choice([0.0, -0.5, 1e308, float("inf"), float("nan"), 0.1])
    if kind == 4:
        return "".join(r.choice(string.printable) for _ in range(r.randrange(12)))
    if kind == 5:
        return "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(8)))
    return r.choice(SPEC_KEYS + TEMPLATE_BITS + NAMES + UDFS + TYPES)


def random_tree(r: random.Random, depth: int = 3) -> Any:
    if depth <= 0 or r.random() < 0.4:
        return random_scalar(r)
    if r.random() < 0.5:
        return [random_tree(r, depth - 1) for _ in range(r.randrange(4))]
    keys = SPEC_KEYS + ["", "x y", "1", "on", "null"]
    return {r.choice(keys) if r.random() < 0.8 else random_scalar(r): random_tree(r, depth - 1)
            for _ in range(r.randrange(5))}


def random_text(r: random.Random) -> str:
    if r.random() < 0.5:
        return "".join(chr(r.randrange(0x110000 if r.random() < 0.05 else 0x250)) for _ in range(r.randrange(200)))
    bits = list("{}%#[]:-,&*!|>'\"\n\t ab1.=") + TEMPLATE_BITS
    return "".join(r.choice(bits) for _ in range(r.randrange(40)))


def random_bytes(r: random.Random) -> bytes:
    base = dump(VALID).encode() if r.random() < 0.5 else b""
    extra = bytes(r.randrange(256) for _ in range(r.randrange(64)))
    pos = r.randrange(len(base) + 1)
    # no BOM, a UTF-8 BOM or a UTF-16 one, then a valid spec with random bytes spliced in
    return r.choice([b"", b"\xef\xbb\xbf", b"\xff\xfe"]) + base[:pos] + extra + base[pos:]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def random_mutation(r: random.Random) -> dict:
    data = copy.deepcopy(VALID)
    for _ in range(r.randrange(1, 5)):
        paths = _paths(data)
        if not paths:
            break
        path = r.choice(paths)
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        if r.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = random_tree(r, 2)
    return data


def random_valid_shape(r: random.Random) -> dict:
    """A spec the schema accepts (mostly) whose meaning is random: what compile must judge."""
    def column() -> dict:
        if r.random() < 0.5:  # a sound column (a builtin on its default inputs): the deep paths get run too
            return {"udf": r.choice(UDFS[:9]), **({"on_error": "null"} if r.random() < 0.3 else {})}
        col: dict[str, Any] = {"udf": r.choice(UDFS)}
        if r.random() < 0.8:
            col["inputs"] = [r.choice(NAMES) for _ in range(r.randrange(4))]
        if r.random() < 0.4:
            col["params"] = {r.choice(["hash_size", "max_tokens", "min_len", "zzz"]): random_scalar(r)
                             for _ in range(r.randrange(3))}
        if r.random() < 0.3:
            col["output"] = r.choice(TYPES)
        if r.random() < 0.3:
            col["on_error"] = r.choice(["null", "fail"])
        return col

    names = NAMES[len(RAW):] if r.random() < 0.7 else NAMES  # derived names, or clashes with raw ones
    tiers = {t: {r.choice(names): column() for _ in range(r.randrange(4))} for t in ("tier1", "tier2", "tier3")}
    seen: set[str] = set()
    for t in ("tier1", "tier2", "tier3"):  # a name in two tiers is a schema error; keep most cases past it
        tiers[t] = {n: c for n, c in tiers[t].items() if n not in seen or r.random() < 0.05}
        seen |= set(tiers[t])
    ingest = r.choice([{"from": "synthetic", "rows": r.randrange(1, 500)}, {"from": "parquet", "path": "x/*.parquet"},
                       {"from": "lance", "uri": "nowhere.lance"}, None])
    spec: dict[str, Any] = {"name": "fuzz", "source": {"table": "data/t.lance", **({"ingest": ingest} if ingest else {})},
                            "features": tiers}
    if r.random() < 0.7:
        spec["model"] = {"id": "vlmspec:tiny-qwen2.5-vl", "image_px": r.choice([28, 56, 224])}
    if r.random() < 0.6:
        spec["curation"] = {"where": r.choice(SQL)} | ({"dedup": {"column": r.choice(NAMES)}} if r.random() < 0.5 else {})
    if r.random() < 0.6:
        spec["split"] = {"by": r.choice(NAMES), "fraction": r.choice([0.1, 0.5])}
    if r.random() < 0.5 and "model" in spec and "split" in spec:
        spec["train"] = {"hiddens": r.choice(NAMES), "tokens": r.choice(NAMES), "optim": {"steps": 2},
                         "lora": {"targets": r.choice([["q_proj"], ["visual.blocks.0.attn.qkv"], ["merger"]])}}
        if r.random() < 0.5:
            spec["eval"] = {"compare": r.choice([["base"], ["base", "tuned"]])}
    return spec


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --- running one case ---------------------------------------------------------------------------

class Judge:
    """Runs cases through load (+ compile) and keeps the counts; any non-VlmspecError is recorded."""

    def __init__(self, workdir: Path):
        from vlmspec.compiler.catalog import ModelFacts

        self.dir = workdir
        (workdir / "udfs.py").write_text(USER_UDFS)
        # a user module with a syntax error: `broken:fn` must give a located CompileError
        (workdir / "broken.py").write_text("def fn(:\n")
        # fixed model facts: compile never reads a model config here, so cases stay fast and offline
        self.facts = ModelFacts("vlmspec:tiny-qwen2.5-vl", "main", 128)
        self.counts: dict[str, dict[str, int]] = {f: {"cases": 0, "loaded": 0, "compiled": 0, "vlmspec_errors": 0,
                                                      "unlocated": 0, "other": 0} for f in FAMILIES}
        self.failures: list[dict[str, Any]] = []

    def run(self, family: str, case: str | bytes) -> None:
        from vlmspec.compiler.errors import VlmspecError

        c = self.counts[family]
        c["cases"] += 1
        try:
            self._load_and_compile(family, case, c)
        except VlmspecError as e:
            c["vlmspec_errors"] += 1
            if not e.problems or not all(str(p) for p in e.problems):
                c["unlocated"] += 1
        except Exception as e:  # noqa: BLE001 -- the point: every other exception is a finding
            c["other"] += 1
            # the first few in full (case and traceback); the count says how many there were
            if len(self.failures) < 20:
                self.failures.append({"family": family, "error": f"{type(e).__name__}: {e}"[:500],
                                      "case": repr(case)[:2000], "traceback": traceback.format_exc()[-2000:]})

    def _load_and_compile(self, family: str, case: str | bytes, c: dict[str, int]) -> None:
        from vlmspec.compiler.compile import compile_spec
        from vlmspec.compiler.load import load_spec, load_spec_text
        from vlmspec.compiler.state import TableState

        if isinstance(case, bytes):
            path = self.dir / "spec.yaml"
            path.write_bytes(case)
            loaded = load_spec(path)
        else:
            loaded = load_spec_text(case, str(self.dir / "spec.yaml"))
        c["loaded"] += 1
        spec = loaded.spec
        state = TableState(uri=spec.source.table)
        compile_spec(spec, state, file=loaded.file, spec_hash=loaded.source_hash, locate=loaded.locate,
                     facts=self.facts if spec.model is not None else None, spec_dir=self.dir)
        c["compiled"] += 1


def make_case(family: str, r: random.Random) -> str | bytes:
    if family == "text":
        return random_text(r)
    if family == "bytes":
        return random_bytes(r)
    if family == "yaml":
        return dump({r.choice(SPEC_KEYS): random_tree(r) for _ in range(r.randrange(6))})
    if family == "mutated":
        return dump(random_mutation(r))
    return dump(random_valid_shape(r))


def run(cases: int, seed: int, out: Path, progress: Callable[[int], None] | None = None) -> Results:
    res = Results("fuzz", "Spec fuzzing: load + compile on hostile input", {"cases": cases, "seed": seed})
    r = random.Random(seed)
    lb, t0 = load(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmspec-fuzz-") as tmp:
        judge = Judge(Path(tmp))
        for i in range(cases):
            # round-robin: every family gets the same share of the cases
            family = FAMILIES[i % len(FAMILIES)]
            judge.run(family, make_case(family, r))
            if progress and (i + 1) % 500 == 0:
                progress(i + 1)
    seconds = time.perf_counter() - t0
    res.figure("seconds", "all cases, load + compile", "s").add(seconds, lb, load())
    total = {k: sum(c[k] for c in judge.counts.values()) for k in next(iter(judge.counts.values()))}
    res.derive("cases", "cases tried", total["cases"], target=">= 5,000", met=total["cases"] >= 5000)
    res.derive("other", "exceptions other than VlmspecError", total["other"], target="0", met=total["other"] == 0)
    res.derive("unlocated", "VlmspecErrors without a message", total["unlocated"], target="0",
               met=total["unlocated"] == 0)
    res.derive("compiled", "cases that loaded and compiled cleanly", total["compiled"],
               how="the rest were refused with a VlmspecError")
    res.details = {"families": judge.counts, "total": total, "failures": judge.failures}
    return res
