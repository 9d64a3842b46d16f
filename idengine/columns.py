"""Column names and prepared-directory file names shared by every step (one place to rename them)."""

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

# Taxonomy ranks recognised in labels.csv, from the top down; species is below all of them.
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")

# Files of a prepared directory (see ARCHITECTURE.md).
RECORDS_FILE = "records.parquet"
UNKNOWN_FILE = "unknown.parquet"
LABEL_MAP_FILE = "label_map.json"
DROPPED_FILE = "dropped.csv"
REPORT_JSON = "prepare_report.json"
REPORT_MD = "prepare_report.md"
CLASS_SIZES_PNG = "class_sizes.png"
CONFIG_FILE = "config.yaml"
