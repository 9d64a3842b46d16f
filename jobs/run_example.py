"""The main job: bundled 12S example -> prepared folds -> cross-validation -> final model -> predictions.

Runs on a laptop or a 2-core CPU machine in minutes with the tiny backbone (jobs/configs/tiny-cpu.yaml), and on a
cluster unchanged:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run_example.py --config jobs/configs/tiny-cpu.yaml --out runs/example
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir holds the idengine package

from idengine.recipes.runtime import init_ray  # noqa: E402
from idengine.config_io import load_config  # noqa: E402
from idengine.recipes.cv import run_cv  # noqa: E402
from idengine.recipes.prepare import prepare_dataset  # noqa: E402
from idengine.recipes.train import train_final  # noqa: E402
from idengine.deploy.predict import predict_file  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("jobs.run_example")

# 1. Parse --config and dotted overrides.
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="jobs/configs/tiny-cpu.yaml")
parser.add_argument("--out", default="runs/example", help="one directory for every step's outputs")
parser.add_argument("overrides", nargs="*", help="section.key=value")
args = parser.parse_args()
config = load_config(args.config, args.overrides)
out = Path(args.out)

# 2. Prepare: load, clean, split once (no Ray needed).
prepared = prepare_dataset(config, out / "prepared")

# 3. Connect to the cluster (RAY_ADDRESS under `ray job submit`) or start a local Ray.
init_ray(None)

# 4. Cross-validate: each fold is one Ray Train run.
cv_dir = run_cv(config, prepared, out / "cv")

# 5. Final model: calibrate on out-of-fold logits, train on all non-test data, test once, export.
model_dir = train_final(config, prepared, cv_dir, out / "model")

# 6. Predict the held-back rare species (absent from the reference) and the test records.
calls = predict_file(model_dir, config.data.sequences, out / "calls.csv", config.predict)

log.info("prepared %s | cv %s | model %s | calls %s", prepared, cv_dir, model_dir, calls)
