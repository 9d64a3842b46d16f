"""Every name idengine writes to disk or reads back: table columns, and the files of each directory it makes.

One home for them, so a file is renamed in one place and every writer and reader agrees. ARCHITECTURE.md describes
what each directory holds.
"""

# --- Columns of the prepared tables (records.parquet, unknown.parquet) and of the token/embedding caches ---
ID = "id"
SEQUENCE = "sequence"
SPECIES = "species"
LABEL = "label"
GROUP = "group"
CLUSTER = "cluster"
FOLD = "fold"
TEST_FOLD = "test"
VECTOR_PREFIX = "vec_"
INPUT_IDS = "input_ids"
N_TOKENS = "n_tokens"
TRUNCATED = "truncated"
EMBEDDING = "embedding"
LOGITS = "logits"

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")
"""Taxonomy ranks recognised in labels.csv, from the top down; species is below all of them."""

# --- A prepared directory (`idengine prepare`) ---
RECORDS_FILE = "records.parquet"
UNKNOWN_FILE = "unknown.parquet"
LABEL_MAP_FILE = "label_map.json"
DROPPED_FILE = "dropped.csv"
REPORT_JSON = "prepare_report.json"
REPORT_MD = "prepare_report.md"
CLASS_SIZES_PNG = "class_sizes.png"
CONFIG_FILE = "config.yaml"
TOKENS_DIR = "tokens"
EMBEDDINGS_DIR = "embeddings"
TOKENS_FILE = "tokens.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
CACHE_COMPLETE = "_COMPLETE.json"
"""Marker of a finished cache directory (tokens/<key>/, embeddings/<key>/)."""

# --- A cv directory (`idengine cv`) ---
METRICS_FILE = "metrics.json"
OOF_FILE = "oof.parquet"
SUMMARY_FILE = "summary.md"
FOLD_HISTORY_DIR = "folds"

# --- A tune directory (`idengine tune`) ---
TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
BEST_CONFIG = "best_config.yaml"
BEST_JSON = "best.json"
TRIALS_DIR = "trials"

# --- A fold checkpoint (train/checkpoint.py; Ray Train persists it under train.storage_path) ---
CKPT_TRAINABLE = "trainable.safetensors"
CKPT_BEST = "best.safetensors"
CKPT_BEST_LOGITS = "best_eval_logits.npy"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "state.json"
CKPT_CONFIG = "config.yaml"
CHECKPOINT_FILES = (CKPT_TRAINABLE, CKPT_BEST, CKPT_BEST_LOGITS, CKPT_OPTIMIZER, CKPT_STATE, CKPT_CONFIG)

# --- An artifact directory (`idengine train`; see deploy/artifact.py) ---
MANIFEST = "idengine.json"
CALIBRATION = "calibration.json"
README = "README.md"
HEAD_FILE = "head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KMER_META = "kmer_model.json"
KMER_ARRAYS = "kmer_model.safetensors"
PROBE_META = "probe.json"
REFERENCE_FILE = "reference.parquet"
"""The reference index's records (id, sequence, species and ranks); its k-mer prefilter is rebuilt on load."""
DECISION_FILE = "decision.safetensors"
DECISION_META = "decision.json"
PROBE_ARRAYS = "probe.safetensors"
BASE_DIR = "base"
MERGED_DIR = "merged"
RELIABILITY_PNG = "reliability.png"
FINAL_REPORT_MD = "final_report.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""Suffixes of formats that may hold pickles; an artifact never contains them and loading one refuses them."""

# --- Calls (`idengine predict`) ---
ERRORS_SUFFIX = ".errors.csv"
