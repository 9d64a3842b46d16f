"""Open-set rows of the benchmark: how often each idengine model calls a species that is not in the reference.

Queries are the records of species set aside by the minimum (`prepared/unknown.parquet`). The species threshold is
chosen as `idengine train` does: temperature-calibrated out-of-fold logits, the lowest confidence whose OOF precision
reaches `calibrate.target_precision`. Baselines and the probe are refitted on every closed-set record; the transformer
reuses each fold's best checkpoint (no extra training) and reports the mean over folds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("bench")


def oof_cutoff(config, cv_dir: Path):
    """Calibrator and species threshold from the cv run's out-of-fold logits (as `idengine train`)."""
    from idengine.evaluate.calibrate import choose_threshold, fit_calibrator
    from idengine.evaluate.oof import read_oof

    _, _, y, logits = read_oof(cv_dir)
    calibrator = fit_calibrator(logits, y, config.calibrate.method)
    return calibrator, choose_threshold(calibrator.apply(logits), y, config.calibrate.target_precision)


def open_set_row(config, cv_dir: Path, unknown_logits_fn, cutoff_fit=None) -> dict:
    """The share of unknown species called at the OOF cutoff (`cutoff_fit` = an `oof_cutoff` result, else fitted)."""
    calibrator, choice = cutoff_fit or oof_cutoff(config, cv_dir)
    probs = calibrator.apply(unknown_logits_fn())
    cutoff = (f"calibrated p >= {choice.threshold:.3f} (OOF precision {choice.target:g})" if choice.reachable else
              f"no threshold reaches OOF precision {choice.target:g} (best {choice.achieved_precision:.3f}): "
              "no species calls")
    return {"n": int(len(probs)), "overclassified": float((probs.max(axis=1) >= choice.threshold).mean()),
            "threshold": choice.threshold, "reachable": choice.reachable,
            "oof_coverage_at_threshold": choice.coverage, "target_precision": choice.target,
            "calibration": calibrator.to_dict(), "cutoff": cutoff}


def kmer_open_set(config, prepared: Path, cv_dir: Path) -> dict:
    """A k-mer model fitted on every closed-set record scores the unknown species."""
    from idengine import layout as C
    from idengine.models.kmer import fit_kmer_model
    from idengine.data.prepared import read_prepared, read_unknown

    def unknown_logits():
        records, labels = read_prepared(prepared)
        model = fit_kmer_model(config.model.kind, records[C.SEQUENCE].to_numpy(), records[C.LABEL].to_numpy(),
                             labels.num_classes, k=config.model.kmer, seed=config.train.seed)
        return model.logits(read_unknown(prepared)[C.SEQUENCE].to_numpy())

    return open_set_row(config, cv_dir, unknown_logits)


def probe_open_set(config, prepared: Path, cv_dir: Path) -> dict:
    """A probe fitted on every closed-set record's cached embedding scores the unknown species' embeddings."""
    from idengine import layout as C
    from idengine.data.prepared import read_prepared, read_unknown
    from idengine.data.tokenize import load_tokenizer, tokenize_batch
    from idengine.features.embeddings import record_embeddings
    from idengine.models.inference import embed_rows
    from idengine.models.probe import fit_probe
    from idengine.models.transformer import load_backbone

    def unknown_logits():
        records, labels = read_prepared(prepared)
        x = record_embeddings(prepared, config, records)  # the cv run's cache
        probe = fit_probe(config.model.probe_head, x, records[C.LABEL].to_numpy(), labels.num_classes,
                          seed=config.train.seed, groups=records[C.GROUP].to_numpy())
        tokens = tokenize_batch({C.SEQUENCE: read_unknown(prepared)[C.SEQUENCE].to_numpy()},
                                load_tokenizer(config.model.backbone), config.model.max_tokens)
        embedded = embed_rows(load_backbone(config.model), list(tokens[C.INPUT_IDS]), config.predict.batch_size,
                              config.model.pooling)
        return probe.logits(embedded)

    return open_set_row(config, cv_dir, unknown_logits)


def transformer_open_set(config, prepared: Path, cv_dir: Path) -> dict:
    """Each fold's best checkpoint scores the unknown species; the row is the mean over folds (no extra training)."""
    import numpy as np

    from idengine import layout as C
    from idengine.data.prepared import read_prepared, read_unknown
    from idengine.data.tokenize import load_tokenizer, tokenize_batch
    from idengine.models.inference import classifier_logits
    from idengine.models.transformer import build_model, load_trainable_state
    from idengine.train.checkpoint import read_best_weights

    _, labels = read_prepared(prepared)
    tokens = tokenize_batch({C.SEQUENCE: read_unknown(prepared)[C.SEQUENCE].to_numpy()},
                            load_tokenizer(config.model.backbone), config.model.max_tokens)[C.INPUT_IDS]
    cutoff_fit = oof_cutoff(config, cv_dir)  # one OOF set for all fold models
    rows = []
    for fold in json.loads((cv_dir / "metrics.json").read_text())["folds"]:
        model = build_model(config.model, config.lora, labels.num_classes, dict(enumerate(labels.species)))
        load_trainable_state(model, read_best_weights(fold["checkpoint"]))
        logits = classifier_logits(model.eval(), list(tokens), config.predict.batch_size)
        rows.append(open_set_row(config, cv_dir, lambda: logits, cutoff_fit))
        log.info("open set, fold %s model: %.3f over-classified", fold["fold"], rows[-1]["overclassified"])
    return {**rows[0], "overclassified": float(np.mean([r["overclassified"] for r in rows])),
            "overclassified_per_fold": [r["overclassified"] for r in rows],
            "cutoff": rows[0]["cutoff"] + "; each fold's model, mean over folds"}
