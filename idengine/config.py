"""Every setting of idengine, as frozen dataclasses, each field with its meaning; `config_io.py` reads and writes them.

The YAML file has one section per dataclass (`data`, `model`, `lora`, `train`, `tune`, `calibrate`, `engine`,
`predict`). An unknown section or key is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_BACKBONE = "InstaDeepAI/nucleotide-transformer-2.5b-multi-species"
TINY_BACKBONE = "tiny"

# The choices of every enumerated setting: modules import these rather than spelling the values again.
MODEL_KINDS = ("transformer", "probe", "kmer-nb", "kmer-linear")
KMER_KINDS = ("kmer-nb", "kmer-linear")
FINETUNE_MODES = ("lora", "full", "head")
PROBE_HEADS = ("linear", "mlp")
POOLINGS = ("mean", "cls")
LABEL_CONFLICT_POLICIES = ("keep", "drop", "majority")
SCHEDULERS = ("cosine", "linear", "constant")
CLASS_WEIGHTINGS = ("none", "inverse", "effective")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TUNE_SCHEDULERS = ("asha", "fifo")
TUNE_DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
CALIBRATION_METHODS = ("temperature", "platt", "isotonic", "none")
BASE_DTYPES = ("fp32", "bf16", "fp16")


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class DataConfig:
    sequences: str = "examples/12s-fish-mini/sequences.fasta.gz"
    """FASTA (plain or .gz) whose headers are record ids."""
    labels: str = "examples/12s-fish-mini/labels.csv"
    """CSV with `id`, `species` and optional taxonomy ranks (kingdom ... genus)."""
    vectors: str | None = None
    """Optional CSV: `id` + numeric columns, carried through as features (`vec_<name>` columns)."""
    clusters: str | None = None
    """Optional CSV: `id`, `cluster`; a whole cluster stays in one fold (or in the test split)."""
    folds_file: str | None = None
    """Optional CSV `id,fold` (fold 0..K-1 or `test`) used instead of computing splits."""
    drop_unmatched_ids: bool = False
    """Drop (and count) ids present in only one input file instead of stopping with an error."""
    drop_duplicate_ids: bool = False
    """Drop (and count) every record of an id that appears twice instead of stopping with an error."""
    min_len_bp: int = 50
    """Cleaned sequences shorter than this are dropped (reason `too_short`)."""
    max_len_bp: int = 20_000
    """Cleaned sequences longer than this are dropped (reason `too_long`)."""
    max_n_fraction: float = 0.05
    """Sequences with a larger fraction of N (after IUPAC codes became N) are dropped (reason `too_many_n`)."""
    label_conflicts: str = "keep"
    """Identical sequences under different species: `keep`, `drop` (all of them) or `majority` (keep the majority species)."""
    min_seqs_per_species: int = 5
    """Species with fewer *distinct* sequences are set aside as `unknown.parquet` (open-set queries)."""
    test_fraction: float = 0.1
    """Fraction of records (by group) held out as the test split, used once by `idengine train`."""
    n_folds: int = 5
    """Number of stratified, grouped cross-validation folds on the non-test records."""
    seed: int = 0
    """Seed of the splits (and of everything else random)."""

    def __post_init__(self) -> None:
        _check_choice("data.label_conflicts", self.label_conflicts, LABEL_CONFLICT_POLICIES)
        if not 0.0 <= self.test_fraction < 0.5:
            raise ValueError("data.test_fraction must be in [0, 0.5)")
        if self.n_folds < 2:
            raise ValueError("data.n_folds must be at least 2")
        if self.min_seqs_per_species < 1:
            raise ValueError("data.min_seqs_per_species must be at least 1")
        if not 0.0 <= self.max_n_fraction <= 1.0:
            raise ValueError("data.max_n_fraction must be in [0, 1]")
        if self.min_len_bp > self.max_len_bp:
            raise ValueError("data.min_len_bp must not exceed data.max_len_bp")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "transformer"
    """The classifier: `transformer` (a backbone fine-tuned with a new head), `probe` (a linear/MLP head on the frozen
    backbone's pooled embeddings, computed once with Ray Data and cached), `kmer-nb` or `kmer-linear` (k-mer models)."""
    backbone: str = DEFAULT_BACKBONE
    """Checkpoint of `transformer` and `probe`: a hub id or local directory of an ESM / Nucleotide Transformer, or `tiny`
    (random, CPU)."""
    revision: str | None = None
    """Hub revision (commit, tag or branch) to pin the backbone to."""
    finetune: str = "lora"
    """How `transformer` adapts the backbone: `lora` (adapters + head), `full` (every weight) or `head` (head only)."""
    probe_head: str = "linear"
    """Head of kind=probe: `linear` (multinomial logistic regression) or `mlp` (one hidden layer, early-stopped)."""
    pooling: str = "mean"
    """Embedding of kind=probe: `mean` of the last hidden states (CLS and padding excluded) or `cls`."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint. Off unless you trust the source."""
    max_tokens: int = 1000
    """Tokens per sequence including CLS; longer sequences are truncated and counted (NT's limit is 1000)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% slower. For the 2.5B model at long lengths."""
    base_dtype: str = "fp32"
    """Precision of the FROZEN base weights: `fp32`, `bf16` (Ampere+ GPUs) or `fp16` (T4/V100); the LoRA adapters and
    the head always stay fp32. Half halves the 9.5 GiB of the 2.5B base."""
    kmer: int = 8
    """k of the k-mer models."""

    def __post_init__(self) -> None:
        if self.backbone in KMER_KINDS:
            raise ValueError(f"model.backbone={self.backbone} is no longer a backbone: a k-mer model has none. Write "
                             f"model.kind={self.backbone} (model.backbone names a transformer checkpoint only)")
        if self.finetune == "probe":
            raise ValueError("model.finetune=probe is no longer a fine-tuning mode (a probe fine-tunes nothing): write "
                             "model.kind=probe")
        _check_choice("model.kind", self.kind, MODEL_KINDS)
        _check_choice("model.finetune", self.finetune, FINETUNE_MODES)
        _check_choice("model.probe_head", self.probe_head, PROBE_HEADS)
        _check_choice("model.pooling", self.pooling, POOLINGS)
        _check_choice("model.base_dtype", self.base_dtype, BASE_DTYPES)
        if not 8 <= self.max_tokens <= 1000:
            raise ValueError("model.max_tokens must be in [8, 1000] (the NT position limit)")
        if not 1 <= self.kmer <= 12:
            raise ValueError("model.kmer must be in [1, 12]")

    @property
    def uses_backbone(self) -> bool:
        """True for the kinds that run a transformer checkpoint (transformer, probe)."""
        return self.kind in ("transformer", "probe")

    def describe(self) -> str:
        """`transformer tiny (full)`, `probe tiny (linear, mean)` or `kmer-nb (k=8)`: what the model is, in a phrase."""
        if self.kind == "transformer":
            return f"transformer {self.backbone} ({self.finetune})"
        if self.kind == "probe":
            return f"probe {self.backbone} ({self.probe_head}, {self.pooling})"
        return f"{self.kind} (k={self.kmer})"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    """LoRA rank: higher adapts more, at more memory."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: tuple[str, ...] = ("query", "key", "value")
    """ESM module names to adapt; peft has no default for ESM, so they are named here."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError("lora.r and lora.alpha must be positive")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Maximum epochs per fold (early stopping may end sooner)."""
    batch_size: int = 16
    """Sequences per step per worker."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    scheduler: str = "cosine"
    """`cosine`, `linear` or `constant`, after linear warm-up."""
    warmup_fraction: float = 0.06
    """Fraction of optimizer steps spent warming up."""
    class_weighting: str = "none"
    """Cross-entropy class weights: `none`, `inverse` (1/n) or `effective` (effective number of samples)."""
    effective_beta: float = 0.999
    """beta of the effective-number weighting (Cui et al. 2019)."""
    patience: int = 3
    """Epochs without improvement of `monitor` before a fold stops; 0 disables early stopping."""
    monitor: str = "pr_auc_macro"
    """Validation metric (higher is better) for early stopping and the best checkpoint."""
    precision: str = "auto"
    """`auto` (bf16 on a GPU that has it, else fp32), `bf16`, `fp16` or `fp32`."""
    num_workers: int = 1
    """Ray Train workers per fold; 0 runs Ray Train's local mode in the driver process."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; fractional values keep small machines from deadlocking."""
    max_failures: int = 1
    """Worker failures a fold survives by resuming from its latest checkpoint."""
    storage_path: str = "runs/ray"
    """Where Ray Train/Tune keep checkpoints: a local or NFS directory, or s3:// / gs:// (needed for multi-node)."""
    train_eval_size: int = 512
    """Training records scored each epoch for the train-vs-validation gap."""
    top_k: int = 5
    """k of the top-k accuracy."""
    seed: int = 0
    """Seed of initialisation, shuffling and dropout."""

    def __post_init__(self) -> None:
        _check_choice("train.scheduler", self.scheduler, SCHEDULERS)
        _check_choice("train.class_weighting", self.class_weighting, CLASS_WEIGHTINGS)
        _check_choice("train.precision", self.precision, PRECISIONS)
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("train.epochs, train.batch_size and train.grad_accum_steps must be positive")
        if self.lr <= 0:
            raise ValueError("train.lr must be positive")
        if self.num_workers < 0:
            raise ValueError("train.num_workers must be >= 0")


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 8
    """Trials Optuna proposes."""
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "train.lr": {"loguniform": [1e-5, 1e-3]},
            "lora.r": {"choice": [4, 8, 16]},
        }
    )
    """Dotted config key -> distribution: {loguniform|uniform: [lo, hi]}, {choice: [...]}, {randint: [lo, hi]}."""
    metric: str = "pr_auc_macro"
    """Validation metric averaged over folds; maximised."""
    scheduler: str = "asha"
    """`asha` (stop poor trials after `grace_folds` folds) or `fifo`."""
    grace_folds: int = 2
    """Folds every trial completes before ASHA may stop it."""
    cpus_per_trial: float = 0.5
    """CPUs held by a trial's driver (the fold trainers ask for their own)."""
    max_concurrent_trials: int = 0
    """0: derived from the cluster's CPUs/GPUs and each trial's needs."""
    name: str = "idengine-tune"
    """Experiment name under train.storage_path."""

    def __post_init__(self) -> None:
        _check_choice("tune.scheduler", self.scheduler, TUNE_SCHEDULERS)
        for key, dist in self.space.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in TUNE_DISTRIBUTIONS:
                raise ValueError(f"tune.space.{key} must be one of {'/'.join(TUNE_DISTRIBUTIONS)}: [...]")


@dataclass(frozen=True)
class EngineConfig:
    enabled: bool = True
    """The call comes from the decision step (reference index + classifier + k-mer evidence); false: from the
    classifier's calibrated probabilities alone, over the classifier's species only."""
    kmer_model: str = "kmer-nb"
    """The k-mer model whose probabilities are evidence beside the classifier's (a k-mer classifier is its own)."""
    index_k: int = 10
    """k of the reference index's k-mer prefilter."""
    index_sampling: int = 2
    """The prefilter keeps 1 in this many k-mers (FracMinHash): memory and time / s, recall barely changes."""
    candidates: int = 16
    """References aligned per query (the prefilter's top candidates): more finds more, costs linearly."""
    min_overlap: float = 0.3
    """An alignment counts only when it overlaps this share of the shorter sequence (else a few bases at 100%)."""
    max_species: int = 8
    """Candidate species per query taken from the aligned hits, best identity first."""
    classifier_top: int = 3
    """The classifier's and the k-mer model's most probable species join the candidates."""
    novel_genus_share: float = 0.3
    """Share of the rare species whose records are simulated as a novel GENUS (their whole genus hidden) rather than
    a novel species, when the decision model learns what 'not in the reference' looks like."""
    rare_balance: float = 0.0
    """Queries of species the reference barely holds, per simulated novel query, that teach the decision model. The
    rare species give some (`known_rare`); kept records queried with their species thinned to one record and the
    classifiers blind to it (`reference/scenarios.py`, `thinned`) make up the rest, at most one per kept record.
    1: a species barely in the reference is as likely as one not in it at all; 0 (the default): no thinned
    queries. Thinned queries fit the scorer only: nothing is judged on them. Measured in bench/README.md ("Thinned
    queries"): more rare species named on a small reference, fewer species calls on the bundled example."""
    hidden: int = 32
    """Hidden units of the decision model's scorer (0: a linear scorer)."""
    seed: int = 0
    """Seed of the simulated novelty and of the decision model's fit."""

    def __post_init__(self) -> None:
        _check_choice("engine.kmer_model", self.kmer_model, KMER_KINDS)
        if self.candidates < 1 or self.max_species < 1 or self.index_sampling < 1 or not 4 <= self.index_k <= 15:
            raise ValueError("engine.candidates, engine.max_species, engine.index_sampling must be >= 1 and "
                             "engine.index_k in [4, 15]")
        if not 0.0 <= self.min_overlap <= 1.0 or not 0.0 <= self.novel_genus_share <= 1.0 or self.rare_balance < 0:
            raise ValueError("engine.min_overlap and engine.novel_genus_share must be in [0, 1], "
                             "engine.rare_balance >= 0")


@dataclass(frozen=True)
class CalibrateConfig:
    method: str = "temperature"
    """`temperature` (multiclass), `platt` or `isotonic` (one-vs-rest), or `none`."""
    target_precision: float = 0.95
    """The species threshold is the lowest confidence whose calls reach this precision on out-of-fold data."""
    rank_fallback: bool = True
    """Below the threshold, call the deepest rank (genus, family...) whose summed probability passes it."""

    def __post_init__(self) -> None:
        _check_choice("calibrate.method", self.method, CALIBRATION_METHODS)
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError("calibrate.target_precision must be in (0, 1]")


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 64
    """Sequences per inference batch."""
    top_k: int = 5
    """Species (with probabilities) written per sequence."""
    num_actors: int = 0
    """Ray Data actors; 0: one per GPU, or one per two CPUs."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
