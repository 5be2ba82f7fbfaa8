"""`vlmspec bench ...` subcommands (registered in runtime/cli.py): the one entry point of the tools.

One module per benchmark (`plan_time.py`, `engine_overhead.py`, `gpu/`, ...) and the tiny-model
builders (`tools/tiny.py`, `tools/pretrain.py`), each imported only when its command runs, so
`vlmspec --help` stays cheap: this module must import no torch, lance or pyarrow. A bare GPU machine
runs the same commands as `python3 -m vlmspec.runtime.cli bench ...` (no console script needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .common import DEFAULT_OUT, parse_ints

bench_app = typer.Typer(no_args_is_help=True, help="Measure vlmspec on this machine; results go to JSON + Markdown.")

OutOpt = typer.Option(DEFAULT_OUT, "--out", help="Directory for <name>.json and <name>.md.")
CORPORA = ("auto", "synthetic", "builtin")  # tiny.corpus's sources, checked before any work starts


def _ints(text: str, flag: str) -> list[int]:
    try:
        return parse_ints(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def _quiet_lance() -> None:
    # Every fragment commit of a backfill logs a Lance WARN line (DataReplacement is "not stable yet");
    # hundreds of them would bury the benchmark's output. Must be set before lance is imported.
    os.environ.setdefault("LANCE_LOG", "error")


def _report(res, out: Path) -> None:
    typer.echo(f"wrote {out / (res.name + '.json')} and {out / (res.name + '.md')}")
    for d in res.derived.values():
        val = d["value"]
        # a short summary for the terminal; the JSON keeps full precision
        val = f"{val:,.4g}" if isinstance(val, float) else (f"{val:,}" if isinstance(val, int) else str(val))
        met = "" if d["met"] is None else ("  [target met]" if d["met"] else "  [TARGET MISSED]")
        typer.echo(f"  {d['label']}: {val} {d['unit']}{('  (target ' + d['target'] + ')') if d['target'] else ''}{met}")


@bench_app.command("plan")
def plan_cmd(rows: str = typer.Option("1000000,100000,10000", "--rows", help="Table sizes, comma-separated."),
             repeats: int = typer.Option(7, "--repeats", min=1, help="Timed repeats per figure."),
             rows_per_fragment: int = typer.Option(8192, "--rows-per-fragment", min=16),
             control: bool = typer.Option(True, "--control/--no-control",
                                          help="Also time the largest row count in as few fragments as the smallest."),
             out: Path = OutOpt) -> None:
    """Time `vlmspec plan` on tables of growing size (it must read metadata only)."""
    _quiet_lance()
    from . import plan_time

    res = plan_time.run(_ints(rows, "--rows"), repeats, out, rows_per_fragment=rows_per_fragment, control=control)
    _report(res, out)


@bench_app.command("backfill")
def backfill_cmd(rows: int = typer.Option(2000, "--rows", min=1, help="Rows of the synthetic table."),
                 image_px: int = typer.Option(256, "--image-px", min=64, help="Size of the synthetic images."),
                 workers: str = typer.Option("1,2", "--workers", help="Worker counts for image.dhash."),
                 repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats per figure."),
                 rows_per_fragment: int = typer.Option(512, "--rows-per-fragment", min=16),
                 noop_rows: str = typer.Option("100000,10000", "--noop-rows",
                                               help="Sizes of the cheap tables for the no-op apply (largest also "
                                                    "times tier-1 rows/s)."),
                 out: Path = OutOpt) -> None:
    """Tier-1 rows/s, dhash through vlmspec vs. a bare loop (efficiency, scaling), no-op apply time."""
    _quiet_lance()
    from . import engine_overhead

    res = engine_overhead.run(rows, image_px, _ints(workers, "--workers"), repeats, out,
                       rows_per_fragment=rows_per_fragment, noop_rows=_ints(noop_rows, "--noop-rows"))
    _report(res, out)


@bench_app.command("apply-data")
def apply_data_cmd(rows: int = typer.Option(1024, "--rows", min=1, help="Rows of the synthetic HF folder."),
                   image_px: int = typer.Option(560, "--image-px", min=64, help="Size of the synthetic images."),
                   workers: Optional[str] = typer.Option(None, "--workers",
                                                         help="Worker counts (default: 1 and all cores)."),
                   repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats per figure."),
                   rows_per_fragment: int = typer.Option(1024, "--rows-per-fragment", min=16),
                   workdir: Optional[Path] = typer.Option(None, "--workdir",
                                                          help="Scratch directory (default: a new temporary one)."),
                   out: Path = OutOpt) -> None:
    """Ingest rows/s from a local HF folder and dhash rows/s, through `vlmspec apply`, over workers."""
    _quiet_lance()
    from . import apply_data

    cores = os.cpu_count() or 1
    res = apply_data.measure_ingest(rows, image_px, _opt_ints(workers, "--workers") or sorted({1, cores}), repeats,
                                    out, rows_per_fragment=rows_per_fragment, workdir=workdir)
    _report(res, out)


@bench_app.command("ray")
def ray_cmd(rows: int = typer.Option(2000, "--rows", min=1, help="Rows of the synthetic table."),
            image_px: int = typer.Option(256, "--image-px", min=64, help="Size of the synthetic images."),
            workers: str = typer.Option("1,2", "--workers", help="Worker counts (the Ray cluster gets the largest)."),
            repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats per figure."),
            rows_per_fragment: int = typer.Option(256, "--rows-per-fragment", min=16),
            cold: bool = typer.Option(True, "--cold/--no-cold",
                                      help="Also time applies that start their own local cluster."),
            tier3_rows: int = typer.Option(512, "--tier3-rows", min=0,
                                           help="Rows of the tier-3 table (vision tower, tiny model, CPU); "
                                                "0 skips it."),
            tier3_rows_per_fragment: int = typer.Option(64, "--tier3-rows-per-fragment", min=16),
            out: Path = OutOpt) -> None:
    """Ray executor vs local: tier-2 and tier-3 scaling over workers, and Ray's overhead for the same plan."""
    _quiet_lance()
    try:
        # checked here, before any table is written: Ray is an optional extra
        import ray  # noqa: F401
    except ImportError:
        raise typer.BadParameter("needs Ray: pip install 'vlmspec[ray]'", param_hint="vlmspec bench ray") from None
    from . import ray_executor

    res = ray_executor.run(rows, image_px, _ints(workers, "--workers"), repeats, out,
                           rows_per_fragment=rows_per_fragment, cold=cold, tier3_rows=tier3_rows,
                           tier3_rows_per_fragment=tier3_rows_per_fragment)
    _report(res, out)


@bench_app.command("reads")
def reads_cmd(rows: int = typer.Option(600, "--rows", min=16, help="Rows of the synthetic table."),
              tokens: int = typer.Option(400, "--tokens", min=1, help="Image tokens per row (hiddens)."),
              hidden: int = typer.Option(2048, "--hidden", min=1, help="Hidden size (2048 = Qwen2.5-VL-3B)."),
              image_kb: int = typer.Option(60, "--image-kb", min=1, help="Image bytes per row, in kB."),
              batch: int = typer.Option(8, "--batch", min=1, help="Rows per read (training batch)."),
              workers: str = typer.Option("0,2", "--workers", help="Loader worker counts (0 = in process)."),
              threads: str = typer.Option("2,4", "--threads", help="Prefetch thread counts tried with 0 workers."),
              loader: bool = typer.Option(True, "--loader/--no-loader", help="Also time our training loader."),
              repeats: int = typer.Option(3, "--repeats", min=1, help="Timed repeats per figure."),
              name: str = typer.Option("reads", "--name",
                                       help="Result name (the README's GPU-machine column reads `reads_gpu_machine`)."),
              out: Path = OutOpt) -> None:
    """Lance vs Parquet (raw and cached hiddens, sequential and shuffled), our loader, plain file reads."""
    _quiet_lance()
    from . import reads

    # plain splits, not `_ints`: 0 is a valid worker count (read in process)
    workers_list = [int(x) for x in workers.split(",") if x.strip()]
    res = reads.run(rows, tokens, hidden, image_kb, repeats, out, batch=batch, workers=workers_list, loader=loader,
                    threads=[int(x) for x in threads.split(",") if x.strip()], name=name)
    _report(res, out)


# an option left out means the benchmark's default (the shape's own lists), not an empty list
def _opt_ints(text: str | None, flag: str) -> list[int] | None:
    return _ints(text, flag) if text else None


def _opt_names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


@bench_app.command("gpu")
def gpu_cmd(phases: str = typer.Option("equivalence,tower,trainstep", "--phases",
                                       help="Comma-separated: equivalence, tower, trainstep, qlora, tier3."),
            shape: str = typer.Option("3b", "--shape", help="`3b` (Qwen2.5-VL-3B, random weights) or `tiny`."),
            device: Optional[str] = typer.Option(None, "--device", help="Device (default: cuda if present)."),
            compile_: bool = typer.Option(True, "--compile/--no-compile", help="Also time torch.compile variants."),
            deadline_s: float = typer.Option(540.0, "--deadline-s", help="Skip work that would start after this."),
            rows: int = typer.Option(1024, "--rows", min=8, help="tier3: rows of the synthetic table."),
            unique: int = typer.Option(256, "--unique", min=1,
                                       help="tier3: distinct images generated (then repeated to --rows)."),
            tier3_batch: int = typer.Option(256, "--tier3-batch", min=1,
                                            help="tier3: engine batch size (vlm.vision_tower's default)."),
            sub_batch: int = typer.Option(16, "--sub-batch", min=1, help="tier3: tower sub-batch in the UDF."),
            tower_threads: str = typer.Option("0", "--tower-threads",
                                              help="tier3: decode thread counts to try (0 = the UDF's default)."),
            qlora_grid: bool = typer.Option(False, "--qlora-grid",
                                            help="qlora: also r16/r64 x batch 2/8/16 (checkpointing on)."),
            tower_batches: Optional[str] = typer.Option(None, "--tower-batches",
                                                        help="tower: batch sizes (default: the shape's)."),
            train_batches: Optional[str] = typer.Option(None, "--train-batches",
                                                        help="trainstep: batch sizes (default: the shape's)."),
            ranks: Optional[str] = typer.Option(None, "--ranks", help="trainstep: LoRA ranks (default: the shape's)."),
            paths: Optional[str] = typer.Option(None, "--paths", help="trainstep: cached,raw (default: both)."),
            variants: Optional[str] = typer.Option(None, "--variants",
                                                   help="trainstep: eager, compiled, nosync, nosync-compiled, graph, "
                                                        "graph-compiled (default: eager,compiled)."),
            workdir: Optional[str] = typer.Option(None, "--workdir",
                                                  help="Scratch directory (tables, checkpoints; default: a new "
                                                       "temporary one)."),
            suffix: str = typer.Option("", "--suffix", help="Appended to each phase's result name."),
            repeats: int = typer.Option(3, "--repeats", min=1),
            out: Path = OutOpt) -> None:
    """Vision tower, LoRA/QLoRA train step and tier-3 backfill at the Qwen2.5-VL-3B shape (GPU)."""
    _quiet_lance()
    from . import gpu

    res = gpu.run(_opt_names(phases) or [], out, shape=shape, device=device, compile=compile_,
                  deadline_s=deadline_s, rows=rows, unique=unique, tier3_batch=tier3_batch, sub_batch=sub_batch,
                  repeats=repeats, tower_batches=_opt_ints(tower_batches, "--tower-batches"),
                  train_batches=_opt_ints(train_batches, "--train-batches"), ranks=_opt_ints(ranks, "--ranks"),
                  workdir=workdir, paths=_opt_names(paths), variants=_opt_names(variants), suffix=suffix,
                  tower_threads=[int(x) for x in tower_threads.split(",") if x.strip()], qlora_grid=qlora_grid)
    for r in res.values():
        _report(r, out)
        # a failed figure does not fail the command (the others stand): say so where it is read
        if r.details.get("errors"):
            typer.echo("  errors: " + json.dumps(r.details["errors"])[:1500])


@bench_app.command("bf16-noise")
def bf16_noise_cmd(shape: str = typer.Option("3b", "--shape", help="`3b` (Qwen2.5-VL-3B, random weights) or `tiny`."),
                   seeds: int = typer.Option(2, "--seeds", min=1, help="Pixel batches (one figure sample each)."),
                   out: Path = OutOpt) -> None:
    """HF's vision tower in bf16 vs fp32: the tolerance two bf16 towers can be held to (CPU is fine)."""
    from . import bf16_noise

    _report(bf16_noise.run(out, shape=shape, seeds=seeds), out)


@bench_app.command("perf-report")
def perf_report_cmd(readme: Path = typer.Argument(Path("README.md"), help="The README to update."),
                    results: Path = typer.Argument(DEFAULT_OUT, help="Where the results JSON are.")) -> None:
    """Rewrite the README's performance tables (between its markers) from the results JSON."""
    from .perf_report import START, update_readme

    typer.echo("updated" if update_readme(readme, results) else f"no {START} block in {readme}")


@bench_app.command("tiny-model")
def tiny_model_cmd(out_dir: Path = typer.Argument(..., help="Directory to write the model into."),
                   seed: int = typer.Option(0, "--seed", help="Tokenizer-corpus and weight-init seed."),
                   vocab_size: int = typer.Option(1536, "--vocab-size", help="Tokenizer vocabulary."),
                   corpus: str = typer.Option("auto", "--corpus",
                                              help="Tokenizer text: `auto`, `synthetic` or `builtin`.")) -> None:
    """Build the tiny random-weight Qwen2.5-VL (tokenizer, processor, config, weights); never downloads."""
    if corpus not in CORPORA:
        raise typer.BadParameter(f"must be one of {', '.join(CORPORA)}, got `{corpus}`", param_hint="--corpus")
    from .. import tiny

    typer.echo(str(tiny.build(out_dir, seed=seed, vocab_size=vocab_size, corpus_source=corpus)))


@bench_app.command("pretrain-tiny")
def pretrain_tiny_cmd(
        out_dir: Path = typer.Argument(..., help="Directory to write the pretrained model into."),
        steps: int = typer.Option(4000, "--steps", help="Optimizer steps (the maximum with --budget-s)."),
        decay_steps: Optional[int] = typer.Option(None, "--decay-steps",
                                                  help="Final linear LR decay (default 20% of steps)."),
        device: str = typer.Option("cpu", "--device"),
        seed: int = typer.Option(1, "--seed", help="Data, tokenizer-corpus and init seed; never 0."),
        batch_size: int = typer.Option(32, "--batch-size", help="Generator rows per step."),
        lr: float = typer.Option(2e-3, "--lr"),
        image_px: int = typer.Option(112, "--image-px"),
        warmup: int = typer.Option(100, "--warmup"),
        log_every: int = typer.Option(10, "--log-every"),
        threads: int = typer.Option(2, "--threads", help="torch intra-op threads."),
        workers: int = typer.Option(0, "--workers", help="Processes rendering batches (0: in the loop)."),
        budget_s: Optional[float] = typer.Option(None, "--budget-s", help="Stop early to fit this many seconds."),
        val_rows: int = typer.Option(128, "--val-rows"),
        eval_only: bool = typer.Option(False, "--eval-only",
                                       help="Only score the saved model in OUT_DIR on its validation rows "
                                            "(quickstart prompt).")) -> None:
    """Pretrain the shipped tiny Qwen2.5-VL on the synthetic reading mix (`tools/pretrain.py` says why)."""
    from .. import pretrain

    log = typer.echo  # flushes each line: a long run's progress shows as it goes
    if eval_only:
        pretrain.evaluate_saved(out_dir, device=device, threads=threads, log=log)
        return
    if seed == 0:
        raise typer.BadParameter("0 is the quickstart's seed; pretraining must use a disjoint seed",
                                 param_hint="--seed")
    pretrain.pretrain(out_dir, steps=steps, device=device, seed=seed, batch_size=batch_size, lr=lr,
                      image_px=image_px, warmup=warmup, log_every=log_every, decay_steps=decay_steps,
                      threads=threads, workers=workers, budget_s=budget_s, val_rows=val_rows, log=log)


# The reliability benchmarks (chaos, fuzz, badrows) and the README section they feed live in their
# own module; registered here, on the one `bench_app`.
from .reliability_commands import add_commands as _add_reliability_commands  # noqa: E402

_add_reliability_commands(bench_app)


@bench_app.command("apply")
def apply_cmd(rows: int = typer.Option(12288, "--rows", min=16, help="Rows of the synthetic HF source."),
              image_px: int = typer.Option(560, "--image-px", min=56, help="Image size (560 = 400 visual tokens)."),
              steps: int = typer.Option(300, "--steps", min=1, help="Training steps (the seed's recipe: 300)."),
              eval_limit: int = typer.Option(400, "--eval", min=1, help="Eval questions per model."),
              shape: str = typer.Option("3b", "--shape", help="`3b` (random weights) or `tiny` (CPU runs)."),
              rounds: str = typer.Option("cold,lora,tower,shapes", "--rounds",
                                         help="Comma-separated: cold, lora, tower, shapes. Without cold, goes on from the "
                                              "table and rounds an earlier run left in --work."),
              deadline_s: float = typer.Option(1e9, "--deadline-s", help="Skip rounds that would start after this."),
              work: Path = typer.Option(Path(".bench-apply"), "--work",
                                        help="Folder for the source, model and table (kept between runs)."),
              py_spy: str = typer.Option(None, "--py-spy", help="A py-spy executable: sample each apply with it "
                                         "(speedscope files beside the results; a profile, not the figures)."),
              out: Path = OutOpt) -> None:
    """The whole `vlmspec apply` of the textvqa recipe through the CLI: per stage, GPU busy, turnaround."""
    _quiet_lance()
    from . import apply_e2e

    res = apply_e2e.run(rows, image_px, steps, eval_limit, out, work.resolve(), shape=shape, deadline_s=deadline_s,
                        rounds=tuple(x.strip() for x in rounds.split(",") if x.strip()), py_spy=py_spy)
    _report(res, out)
