"""The one path rule: relative paths in a spec are relative to the spec file's folder, whatever the
current directory; load resolves them, so everything downstream sees absolute paths."""

from __future__ import annotations

import os
import textwrap

from vlmspec.compiler.compile import compile_spec
from vlmspec.compiler.load import load_spec, load_spec_text
from vlmspec.compiler.paths import shown
from vlmspec.compiler.state import TableState

from helpers import ROOT

SPEC = textwrap.dedent("""\
    name: p
    vars: {data: data}
    source:
      table: "{{ data }}/p.lance"
      ingest: INGEST
    model: {id: MODEL, image_px: 56}
    split: {table: ../evals/e.lance}
    train:
      optim: {steps: 1}
    eval: {limit: 4}
""")


def write(d, ingest="{from: parquet, path: 'raw/*.parquet'}", model="Qwen/Qwen2.5-VL-3B-Instruct"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec.yaml").write_text(SPEC.replace("INGEST", ingest).replace("MODEL", model))
    return d / "spec.yaml"


def test_relative_paths_resolve_against_the_spec_folder_from_any_directory(tmp_path, monkeypatch):
    spec_file = write(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_spec("../proj/spec.yaml")
    proj = str(tmp_path / "proj")
    s = loaded.spec
    assert s.source.table == f"{proj}/data/p.lance"
    assert s.source.ingest.path == f"{proj}/raw/*.parquet"
    assert s.split.table == f"{tmp_path}/evals/e.lance"
    assert s.train.output_dir == f"{proj}/runs/p" and s.eval.output_dir == f"{proj}/runs/p/eval"  # defaults too
    assert s.model.id == "Qwen/Qwen2.5-VL-3B-Instruct"  # a hub id stays one
    assert loaded.base_dir == proj
    assert loaded.written == {"source.table": "data/p.lance", "source.ingest.path": "raw/*.parquet",
                              "split.table": "../evals/e.lance"}
    assert loaded.source_hash == load_spec(spec_file).source_hash  # the text, not where it was read from


def test_uris_hub_ids_and_local_folders(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    spec = write(tmp_path, ingest="{from: huggingface, dataset: ./saved}", model="models/tiny")
    monkeypatch.chdir("/")
    s = load_spec(spec).spec
    assert s.source.ingest.dataset == f"{tmp_path}/saved"   # written as a path: a folder, even if missing
    assert s.model.id == f"{tmp_path}/models/tiny"            # names a folder next to the spec
    text = SPEC.replace("INGEST", "{from: lance, uri: 's3://bucket/src.lance'}").replace("MODEL", "vlmspec:tiny-qwen2.5-vl")
    (tmp_path / "uri.yaml").write_text(text.replace('"{{ data }}/p.lance"', "s3://bucket/p.lance"))
    s = load_spec(tmp_path / "uri.yaml").spec
    assert (s.source.table, s.source.ingest.uri, s.model.id) == ("s3://bucket/p.lance", "s3://bucket/src.lance",
                                                                "vlmspec:tiny-qwen2.5-vl")


def test_text_without_a_folder_keeps_paths_as_written():
    s = load_spec_text(SPEC.replace("INGEST", "{from: synthetic}").replace("MODEL", "m"), "s.yaml").spec
    assert s.source.table == "data/p.lance" and s.train.output_dir is None


def test_shown_is_relative_under_the_current_directory_else_absolute(tmp_path):
    assert shown(f"{tmp_path}/data/t.lance", cwd=str(tmp_path)) == "data/t.lance"
    assert shown(f"{tmp_path}/data/t.lance", cwd=str(tmp_path / "sub")) == f"{tmp_path}/data/t.lance"
    assert shown("s3://b/t.lance") == "s3://b/t.lance" and shown("rel/t.lance") == "rel/t.lance"


def test_shipped_specs_write_to_the_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    for spec, table, runs in [("specs/quickstart.yaml", "data/quickstart.lance", "runs/quickstart"),
                              ("specs/textvqa.yaml", "data/textvqa.lance", "runs/textvqa-text-dense"),
                              ("examples/custom_udf/spec.yaml", "data/custom_udf.lance", None)]:
        s = load_spec(spec).spec
        assert shown(s.source.table) == table
        assert (shown(s.train.output_dir) if s.train else None) == runs


def test_a_climbing_path_is_flagged_by_where_it_lands(tmp_path, monkeypatch):
    """`..` is how a spec in specs/ reaches data/ at the repo root: flagged only when it lands
    outside the current directory."""
    monkeypatch.chdir(ROOT)
    loaded = load_spec("specs/quickstart.yaml")

    def warnings():
        state = TableState(uri=loaded.spec.source.table, source_rows=10)
        c = compile_spec(loaded.spec, state, file=loaded.file, locate=loaded.locate, written=loaded.written,
                         spec_dir=ROOT / "specs", facts=None if loaded.spec.model is None else _facts())
        return [w for w in c.warnings if "`..`" in w]

    assert warnings() == []
    monkeypatch.chdir(ROOT / "specs")
    assert warnings() == [
        f"`source.table` `../data/quickstart.lance` has a `..` segment: it writes to `{ROOT}/data/quickstart.lance`, "
        "outside the current directory; check that is intended",
        f"`train.output_dir` `../runs/quickstart` has a `..` segment: it writes to `{ROOT}/runs/quickstart`, "
        "outside the current directory; check that is intended"]
    assert os.getcwd() == str(ROOT / "specs")


def _facts():
    from vlmspec.compiler.catalog import ModelFacts

    return ModelFacts("vlmspec:tiny-qwen2.5-vl", "main", 128)
