"""Spec models: the shape of a vlmspec YAML file (pydantic v2, frozen, unknown keys forbidden).

Pydantic checks shape and single-field rules here; meaning (column references, cycles, types
between producer and consumer) is checked by the compiler in `graph.py`/`compile.py`.
Attribute docstrings become JSON-schema descriptions (`vlmspec schema`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .types import TypeSyntaxError, canonical

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=128)]


class SpecModel(BaseModel):
    """Base of every spec section: frozen, strict about unknown keys, documented."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              populate_by_name=True, allow_inf_nan=False)


# --- source -------------------------------------------------------------------------------


class SyntheticIngestSpec(SpecModel):
    """Generate TextVQA-shaped rows offline (Pillow-rendered scenes with text)."""

    kind: Literal["synthetic"] = Field(alias="from")
    rows: int = Field(2000, ge=1, le=10_000_000)
    """How many rows to generate."""
    seed: Seed = 0
    """Seed of the generator; the same seed gives byte-identical rows."""
    image_px: int = Field(256, ge=64, le=2048)
    """Size of the rendered square scenes in pixels."""


class HuggingFaceIngestSpec(SpecModel):
    """Stream a Hugging Face dataset (by id, or a `save_to_disk` directory) through `datasets`."""

    kind: Literal["huggingface"] = Field(alias="from")
    dataset: str = Field(min_length=1)
    """Dataset id on the hub (e.g. `lance-format/textvqa-lance`) or a local directory."""
    split: str = "train"
    """Which split to ingest."""
    revision: str | None = None
    """Dataset revision (commit, tag or branch) to pin."""
    limit: int | None = Field(None, ge=1)
    """Stop after this many rows."""
    columns: list[Identifier] | None = None
    """Keep only these columns (default: all)."""


class ParquetIngestSpec(SpecModel):
    """Stream Parquet files (a path, directory or glob) into the table."""

    kind: Literal["parquet"] = Field(alias="from")
    path: str = Field(min_length=1)
    """A Parquet file, a directory of them, or a glob."""
    limit: int | None = Field(None, ge=1)
    """Stop after this many rows."""
    columns: list[Identifier] | None = None
    """Keep only these columns (default: all)."""


class LanceIngestSpec(SpecModel):
    """Copy an existing Lance dataset into the table."""

    kind: Literal["lance"] = Field(alias="from")
    uri: str = Field(min_length=1)
    """URI of the source Lance dataset."""
    version: int | None = Field(None, ge=1)
    """Source version to read (default: latest)."""
    limit: int | None = Field(None, ge=1)
    """Stop after this many rows."""
    columns: list[Identifier] | None = None
    """Keep only these columns (default: all)."""


IngestSpec = Annotated[
    Union[SyntheticIngestSpec, HuggingFaceIngestSpec, ParquetIngestSpec, LanceIngestSpec],
    Field(discriminator="kind"),
]


class SourceSpec(SpecModel):
    """The Lance table the experiment lives in, and optionally where its rows come from."""

    table: str = Field(min_length=1)
    """Path or URI of the Lance table (created by ingest if missing)."""
    ingest: IngestSpec | None = None
    """Where raw rows come from; omit when the table already exists."""
    rows_per_fragment: int = Field(1024, ge=16, le=1_048_576)
    """Rows per Lance fragment written by ingest; a fragment is the backfill checkpoint unit."""
    key: Identifier = "question_id"
    """Column that identifies a row in the source, so re-running ingest never duplicates rows."""


# --- model --------------------------------------------------------------------------------


class ModelSpec(SpecModel):
    """The vision-language model whose tower is cached and whose language side is tuned."""

    id: str = Field(min_length=1)
    """Hugging Face model id, a local directory, or `vlmspec:tiny-qwen2.5-vl` (shipped)."""
    revision: str = "main"
    """Model revision (commit, tag or branch). Pin a commit for reproducible caches."""
    image_px: int = Field(560, ge=28, le=4032)
    """Images are resized to image_px x image_px; a multiple of 28 (14 px patches, 2x2 merge)."""
    hidden_size: int | None = Field(None, ge=1)
    """Width of the merged vision tokens; read from the model config when omitted."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the model. Off unless you trust the model repo."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype for the vision tower and evaluation (`auto`: bf16 on GPU, fp32 on CPU)."""

    @field_validator("image_px")
    @classmethod
    def check_image_px_multiple_of_28(cls, v: int) -> int:
        if v % 28:
            lo, hi = v // 28 * 28, (v // 28 + 1) * 28
            raise ValueError(f"must be a multiple of 28 (14 px patches merged 2x2); try {lo or 28} or {hi}")
        return v

    @property
    def image_tokens(self) -> int:
        """Merged visual tokens per image: (image_px / 28)^2."""
        return (self.image_px // 28) ** 2


# --- features -----------------------------------------------------------------------------


class ResourcesSpec(SpecModel):
    """What one worker of this UDF needs."""

    gpus: float = Field(0, ge=0, le=64)
    """GPUs per worker (fractions share a GPU)."""
    cpus: float = Field(1, gt=0, le=1024)
    """CPU cores per worker."""


class ColumnSpec(SpecModel):
    """One derived column: which UDF makes it, from which columns, with which parameters."""

    udf: str = Field(min_length=1)
    """A builtin (`text.length`, `image.dhash`, `vlm.vision_tower`, ...) or `module:function`."""
    inputs: list[Identifier] | None = None
    """Columns passed to the UDF, in order (default: the UDF's declared inputs)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword parameters of the UDF; part of the column's fingerprint."""
    output: str | None = None
    """Arrow type of the column, for UDFs that do not declare one (e.g. `int32`, `list<string>`)."""
    batch_size: int | None = Field(None, ge=1, le=1_000_000)
    """Rows per UDF call (default: the UDF's own)."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """CPUs/GPUs per worker."""
    on_error: Literal["fail", "null"] = "fail"
    """`fail` stops at the first failing row; `null` stores null and records the row's error."""
    description: str = ""
    """Free text; not part of the fingerprint."""
    tuning: dict[str, Any] = Field(default_factory=dict)
    """Speed knobs the UDF declares (e.g. `vlm.vision_tower`'s `sub_batch`, `decode_threads`, `compile`),
    checked against its declaration. Not part of the fingerprint: a knob changes how fast values are
    computed, not which (at most floating-point rounding, as `compile` does), so no cache recomputes."""

    @field_validator("udf")
    @classmethod
    def check_udf_reference(cls, v: str) -> str:
        if ":" in v:
            module, _, func = v.partition(":")
            if not module or not func.isidentifier():
                raise ValueError("a user UDF is written `module:function` (e.g. `udfs:caption_words`)")
        elif not all(part.isidentifier() for part in v.split(".")):
            raise ValueError("a builtin UDF is written `family.name` (e.g. `text.length`)")
        return v

    @field_validator("output")
    @classmethod
    def check_output_type(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return canonical(v)
        except TypeSyntaxError as e:
            raise ValueError(f"not an Arrow type: {e}") from None


class FeaturesSpec(SpecModel):
    """Derived columns grouped by cost tier. Names are column names in the table."""

    tier1: dict[Identifier, ColumnSpec] = Field(default_factory=dict)
    """Cheap text/metadata features (CPU, vectorised)."""
    tier2: dict[Identifier, ColumnSpec] = Field(default_factory=dict)
    """Image features that decode pixels (CPU, all cores)."""
    tier3: dict[Identifier, ColumnSpec] = Field(default_factory=dict)
    """Model features: vision-tower hidden states, tokenized SFT prompts (GPU when present)."""

    @model_validator(mode="after")
    def check_names_unique_across_tiers(self) -> "FeaturesSpec":
        seen: dict[str, str] = {}
        for tier in ("tier1", "tier2", "tier3"):
            for name in getattr(self, tier):
                if name in seen:
                    raise ValueError(f"column `{name}` is declared in both {seen[name]} and {tier}")
                seen[name] = tier
        return self

    def columns(self) -> list[tuple[str, str, ColumnSpec]]:
        """(tier, name, spec) in declaration order."""
        return [(t, n, c) for t in ("tier1", "tier2", "tier3") for n, c in getattr(self, t).items()]


# --- curation and split -------------------------------------------------------------------


class DedupSpec(SpecModel):
    """Drop near-duplicate images from the training slice by perceptual-hash distance."""

    column: Identifier = "dhash"
    """A uint64 perceptual-hash column. (Not `on:`: YAML 1.1 reads a bare `on` key as true.)"""
    max_distance: int = Field(4, ge=0, le=64)
    """Rows whose hashes differ in at most this many bits count as the same image."""


class CurationSpec(SpecModel):
    """Which rows train: a SQL predicate over columns, with quantile helpers, plus dedup."""

    name: Identifier = "slice"
    """Name of the slice (shown in plans and recorded with the run)."""
    where: str | None = None
    """SQL predicate, e.g. `ocr_token_count >= quantile(ocr_token_count, 0.75)`."""
    dedup: DedupSpec | None = None
    """Optional near-duplicate removal."""
    limit: int | None = Field(None, ge=1)
    """Keep at most this many rows (a deterministic sample)."""
    seed: Seed = 0
    """Seed for the `limit` sample."""


class SplitSpec(SpecModel):
    """The held-out evaluation split: whole groups (e.g. images) never seen in training."""

    by: Identifier = "image_id"
    """Group column; every row of a group lands on the same side."""
    fraction: float | None = Field(0.1, gt=0, lt=1)
    """Fraction of groups held out for evaluation."""
    seed: Seed = 0
    """Seed of the group assignment (deterministic)."""
    table: str | None = None
    """Use an existing Lance table as the eval set instead of holding out a fraction."""
    curated: bool = True
    """Apply the curation predicate to the eval side too, so eval matches the training slice."""

    @model_validator(mode="after")
    def check_table_or_fraction(self) -> "SplitSpec":
        if self.table is not None and "fraction" in self.model_fields_set:
            raise ValueError("give either `table` (an existing eval table) or `fraction`, not both")
        return self


# --- train --------------------------------------------------------------------------------


class QuantSpec(SpecModel):
    """Weight quantisation of the frozen language model (QLoRA when bits is 4)."""

    bits: Literal[4, 8, 16, 32] = 16
    """4 = NF4/FP4 via bitsandbytes (QLoRA), 8 = int8, 16 = bf16, 32 = fp32."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit/param)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype matmuls run in."""


class LoraSpec(SpecModel):
    """LoRA adapters on the language side."""

    r: int = Field(16, ge=1, le=1024)
    """Adapter rank."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator (effective scale alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    """Module names (or regex) to adapt."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter."""


class OptimSpec(SpecModel):
    """Optimiser, schedule and batch geometry."""

    lr: float = Field(3e-5, gt=0, le=1)
    """Peak learning rate (AdamW)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup: float = Field(0, ge=0)
    """Warmup: a fraction of all steps if < 1, else a number of steps."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps (give steps or epochs)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the slice (give steps or epochs)."""
    batch_size: int = Field(2, ge=1, le=4096)
    """Rows per micro-batch."""
    grad_accum: int = Field(1, ge=1, le=4096)
    """Micro-batches per optimizer step."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm (null: no clipping)."""
    seed: Seed = 0
    """Seed for initialisation, shuffling and dropout."""

    @model_validator(mode="after")
    def check_steps_or_epochs(self) -> "OptimSpec":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of `steps` or `epochs`")
        return self


class TrainSpec(SpecModel):
    """QLoRA/LoRA training from cached Lance columns; the vision tower is never loaded."""

    hiddens: Identifier = "vision_tower_hiddens"
    """Column of cached vision-tower outputs (a `vlm.vision_tower` feature)."""
    tokens: Identifier = "sft_tokens"
    """Column of tokenized prompts and labels (a `vlm.sft_tokens` feature)."""
    quant: QuantSpec = Field(default_factory=QuantSpec)
    """Quantisation of the frozen weights."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter settings."""
    optim: OptimSpec
    """Optimiser and schedule."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in backward to save memory. `auto` (default): only when the step's
    estimated peak (shown by `vlmspec plan`) would not fit the device's free memory. Not part of
    the fingerprint (it changes speed and memory, not the result beyond floating-point noise)."""
    fuse_accum: bool | Literal["auto"] = "auto"
    """Run an optimizer step's `grad_accum` micro-batches as fewer, larger passes (`true`: one pass of
    `batch_size x grad_accum` rows). The loss is token-weighted over the whole step either way, so
    the gradient is the same up to floating-point rounding (LoRA dropout draws its masks per pass);
    one pass dequantizes the 4-bit weights and launches the kernels once instead of `grad_accum`
    times. `auto` (default): on CUDA, the most micro-batches per pass whose estimated peak fits the
    device's free memory (`vlmspec plan` shows it); one per pass elsewhere. Not in the fingerprint."""
    checkpoint_every: int = Field(50, ge=1)
    """Save adapter + optimizer state every N optimizer steps (for resume)."""
    log_every: int = Field(10, ge=1)
    """Log loss every N optimizer steps."""
    num_workers: int = Field(0, ge=0, le=64)
    """Data-loader worker processes (spawned)."""
    loader_threads: int = Field(4, ge=1, le=64)
    """With `num_workers: 0`, in-process threads that fetch batches ahead (Lance reads release the
    GIL, and threads skip the inter-process copy of each batch)."""
    devices: int = Field(1, ge=1, le=64)
    """Data-parallel processes."""
    compile: Literal["auto", "none", "layers", "graph"] = "auto"
    """Speed of the step on CUDA (ignored on CPU); same results up to floating-point noise, so not in
    the fingerprint. `layers`: `torch.compile` each decoder layer (one compiled layer shared by all,
    about a minute of warm-up). `graph`: capture forward + backward once and replay it as one CUDA
    graph (removes the per-kernel launch cost that bounds small batches). `auto` (default): the
    fastest mode measured for the configuration (`vlmspec plan` shows which)."""
    output_dir: str | None = None
    """Where the adapter, checkpoints and logs go (default: `runs/<name>`)."""
    report_to: Literal["none", "tensorboard"] = "none"
    """Also write the training metrics as TensorBoard event files in `<output_dir>/tensorboard`
    (needs `pip install 'vlmspec[tensorboard]'`). Not part of the fingerprint."""


# --- eval ---------------------------------------------------------------------------------


class GenerationSpec(SpecModel):
    """Decoding settings for evaluation."""

    max_new_tokens: int = Field(16, ge=1, le=4096)
    """Longest answer generated."""
    do_sample: bool = False
    """Greedy when false."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with do_sample)."""


class EvalSpec(SpecModel):
    """Base vs tuned on the held-out split, on raw images through the full model."""

    metric: Literal["vqa_accuracy"] = "vqa_accuracy"
    """Official TextVQA/VQA accuracy (EvalAI answer normalisation, 10-way leave-one-out)."""
    compare: list[Literal["base", "tuned"]] = Field(default_factory=lambda: ["base", "tuned"], min_length=1)
    """Models to evaluate on the same questions."""
    limit: Annotated[int, Field(ge=1)] | Literal["all"] | None = 400
    """Evaluate at most this many held-out questions (a seeded random sample); `all` (or null) for the
    whole held-out split."""
    seed: Seed = 0
    """Seed of the question sample and the bootstrap."""
    bootstrap: int = Field(2000, ge=100, le=1_000_000)
    """Paired bootstrap resamples for the lift's confidence interval."""
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    """Questions per generate call; `auto`: 256 on CUDA GPUs of 64 GiB or more, 128 on smaller
    ones, 8 on CPU (not fingerprinted: answers do not
    depend on it beyond floating-point rounding)."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Decoding settings."""
    output_dir: str | None = None
    """Where results go (default: the train output dir + `/eval`)."""


class ExecutorSpec(SpecModel):
    """Where steps run."""

    kind: Literal["local", "ray", "geneva"] = "local"
    """`local`: in-process; `ray`: tasks and actors on a Ray cluster; `geneva`: each column as a
    Geneva backfill (`pip install 'vlmspec[geneva]'`)."""
    address: str | None = None
    """Ray address (`auto`, `ray://host:10001`, or `local` to start one); under `geneva` also
    `kuberay:<cluster>` for a Geneva cluster defined with Geneva's cluster API."""
    workers: int | None = Field(None, ge=1, le=100_000)
    """Parallel workers for CPU UDFs (default: all cores)."""


# --- root ---------------------------------------------------------------------------------


class Spec(SpecModel):
    """A whole VLM fine-tuning experiment on one Lance table."""

    name: Name
    """Experiment name (letters, digits, `_`, `-`, `.`; used in output paths and run history)."""
    description: str = ""
    """Free text."""
    vars: dict[Identifier, Any] = Field(default_factory=dict)
    """Template variables for `{{ ... }}` in the rest of the file; override with --var k=v."""
    source: SourceSpec
    """The table and its ingest."""
    model: ModelSpec | None = None
    """The VLM (needed by tier-3 model features, train and eval)."""
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    """Derived columns by tier."""
    curation: CurationSpec | None = None
    """Training slice (default: every training row)."""
    split: SplitSpec | None = None
    """Held-out eval split (default: none; train and eval need one)."""
    train: TrainSpec | None = None
    """LoRA/QLoRA training."""
    eval: EvalSpec | None = None
    """Evaluation of base vs tuned."""
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    """Local or Ray execution."""

    @model_validator(mode="after")
    def check_sections_that_need_others(self) -> "Spec":
        problems = []
        if self.train is not None and self.model is None:
            problems.append("`train` needs a `model` section")
        if self.train is not None and self.split is None:
            problems.append("`train` needs a `split` section (a held-out eval split)")
        if self.eval is not None and self.train is None and "tuned" in self.eval.compare:
            problems.append("`eval.compare` includes `tuned` but there is no `train` section")
        if problems:
            raise ValueError("; ".join(problems))
        return self
