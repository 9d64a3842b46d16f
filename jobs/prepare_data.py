"""Prepare a labelled barcode set: load, clean, split once, report.

Submit to a running cluster (a local head, or the GPU cluster of cluster/):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_data.py --config jobs/configs/tiny-cpu.yaml --out runs/prepared
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the idengine package

from idengine.config_io import load_config  # noqa: E402
from idengine.recipes.prepare import prepare_dataset  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

# 1. Parse --config and dotted overrides (train.lr=3e-4).
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config, e.g. jobs/configs/tiny-cpu.yaml")
parser.add_argument("--out", required=True, help="output directory")
parser.add_argument("overrides", nargs="*", help="section.key=value")
args = parser.parse_args()
config = load_config(args.config, args.overrides)

# 2. Run.
out = prepare_dataset(config, args.out)

# 3. Say where the outputs went.
logging.getLogger("jobs.prepare_data").info("outputs in %s", out)
