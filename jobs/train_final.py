"""Train the final model on all non-test records, calibrate on out-of-fold logits, test once, export.

Submit to a running cluster (a local head, or the GPU cluster of cluster/):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_final.py --config runs/tune/best_config.yaml --prepared runs/prepared --cv runs/cv --out runs/model
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the idengine package

from idengine.recipes.runtime import init_ray  # noqa: E402
from idengine.config_io import load_config  # noqa: E402
from idengine.recipes.train import train_final  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

# 1. Parse --config and dotted overrides (train.lr=3e-4).
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config, e.g. jobs/configs/tiny-cpu.yaml")
parser.add_argument("--prepared", required=True, help="output directory of prepare_data.py")
parser.add_argument("--cv", required=True, help="output directory of cv.py (out-of-fold logits)")
parser.add_argument("--out", required=True, help="output directory")
parser.add_argument("overrides", nargs="*", help="section.key=value")
args = parser.parse_args()
config = load_config(args.config, args.overrides)

# 2. Connect to the cluster that `ray job submit` runs us on (RAY_ADDRESS), or start a local Ray.
init_ray(None)

# 3. Run.
out = train_final(config, args.prepared, args.cv, args.out)

# 4. Say where the outputs went.
logging.getLogger("jobs.train_final").info("outputs in %s", out)
