"""Config loading: YAML + dotted overrides, validation, round trip."""

import pytest

from idengine.config import Config
from idengine.config_io import load_config, save_config, with_values

CONFIGS = ["jobs/configs/tiny-cpu.yaml", "jobs/configs/nt2.5b-1gpu.yaml", "jobs/configs/nt2.5b-cluster.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_overrides_are_typed():
    config = load_config(None, ["train.lr=3e-4", "lora.r=16", "model.trust_remote_code=false",
                                "lora.target_modules=[query,value]", "data.vectors=null"])
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.lora.r == 16
    assert config.lora.target_modules == ("query", "value")
    assert config.data.vectors is None


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "c.yaml").train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key"),
    ("trainer.lr=1", "unknown config section"),
    ("train.lr", "section.key=value"),
    ("train.lr=abc", "must be a number"),
    ("train.scheduler=step", "cosine, linear, constant"),
    ("model.finetune=prefix", "lora, full, head"),
    ("model.kind=forest", "transformer, probe, kmer-nb, kmer-linear"),
    ("data.n_folds=1", "at least 2"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_search_space_override_and_trial_values():
    config = load_config(None, ["tune.space.lora.alpha={choice: [8, 32]}"])
    assert config.tune.space["lora.alpha"] == {"choice": [8, 32]}
    assert "train.lr" in config.tune.space  # the defaults stay
    trial = with_values(config, {"train.lr": 1e-3, "lora.r": 4})
    assert trial.train.lr == 1e-3 and trial.lora.r == 4 and trial.data == config.data
    with pytest.raises(ValueError, match="unknown config key"):
        with_values(config, {"train.nope": 1})


def test_defaults_point_at_the_real_backbone_and_keep_remote_code_off():
    config = Config()
    assert config.model.backbone == "InstaDeepAI/nucleotide-transformer-2.5b-multi-species"
    assert config.model.trust_remote_code is False


def test_probe_settings_are_validated():
    config = load_config(None, ["model.kind=probe", "model.probe_head=mlp", "model.pooling=cls"])
    assert (config.model.kind, config.model.probe_head, config.model.pooling) == ("probe", "mlp", "cls")
    with pytest.raises(ValueError, match="probe_head"):
        load_config(None, ["model.probe_head=forest"])
    with pytest.raises(ValueError, match="pooling"):
        load_config(None, ["model.pooling=max"])


@pytest.mark.parametrize("override, new_key", [
    ("model.backbone=kmer-nb", "model.kind=kmer-nb"),
    ("model.backbone=kmer-linear", "model.kind=kmer-linear"),
    ("model.finetune=probe", "model.kind=probe"),
])
def test_old_spellings_name_the_new_key(override, new_key):
    """model.kind replaced backbone/finetune doing double duty: the old spellings say what to write instead."""
    with pytest.raises(ValueError, match=new_key):
        load_config(None, [override])


def test_model_kind_selects_and_describes_the_classifier():
    assert load_config(None, ["model.kind=kmer-nb"]).model.describe() == "kmer-nb (k=8)"
    assert load_config(None, ["model.backbone=tiny", "model.finetune=full"]).model.describe() == \
        "transformer tiny (full)"
    assert load_config(None, ["model.kind=probe", "model.backbone=tiny"]).model.uses_backbone


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  epochs: abc\n", "train.epochs must be a whole number, not 'abc' (str)"),
    ("train:\n  epochs: [1]\n", "train.epochs must be a whole number, not [1] (list)"),
    ("data:\n  n_folds: 2.5\n", "data.n_folds must be a whole number, not 2.5 (float)"),
    ("data:\n  seed: true\n", "data.seed must be a whole number, not True (bool)"),
    ("model:\n  trust_remote_code: yes please\n", "model.trust_remote_code must be true or false, not 'yes please'"),
    ("train:\n  lr: .inf\n", "train.lr must be a finite number"),
    ("model:\n  revision: 1234\n", "model.revision must be text"),
    ("lora:\n  target_modules: query\n", "lora.target_modules must be a list of names"),
    ("train: 3\n", "section 'train' must be a mapping"),
])
def test_values_of_the_wrong_type_name_the_file_key_value_and_type(tmp_path, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "c.yaml")
    assert message in str(err.value) and str(tmp_path / "c.yaml") in str(err.value)


def test_an_override_fixes_a_file_and_text_settings_keep_the_text_as_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: [1]\n")
    assert load_config(tmp_path / "c.yaml", ["train.epochs=3"]).train.epochs == 3
    with pytest.raises(ValueError) as err:  # a bad override is named without blaming the file
        load_config(tmp_path / "c.yaml", ["train.epochs=3", "data.n_folds=x"])
    assert str(err.value) == "data.n_folds must be a whole number, not 'x' (str)"
    assert load_config(None, ["model.revision=0123", "tune.name=2024"]).model.revision == "0123"


def test_unreadable_or_missing_config_files_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  n_folds: [5\n")
    with pytest.raises(ValueError, match="not a readable YAML config .* at line 3"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_trial_values_of_numpy_types_are_accepted():
    import numpy as np

    trial = with_values(load_config(None), {"train.lr": np.float64(1e-3), "lora.r": np.int64(4),
                                            "model.trust_remote_code": np.bool_(False)})
    assert (trial.train.lr, trial.lora.r, trial.model.trust_remote_code) == (1e-3, 4, False)
    assert type(trial.lora.r) is int
