from pathlib import Path

import pytest

from core.config import Config, load_config, save_config
from core.registry import ConfigError


def test_defaults_are_ctclip():
    cfg = load_config()
    assert cfg.data.target_shape == [240, 480, 480]
    assert cfg.data.target_spacing == [1.5, 0.75, 0.75]
    assert cfg.data.hu_window == [-1000.0, 1000.0]
    assert cfg.train.lr == pytest.approx(1.25e-6)
    assert cfg.train.weight_decay == pytest.approx(0.01)


def test_misspelt_key_names_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  atention: sdpa\n")
    with pytest.raises(ConfigError, match=r"model\.atention.*did you mean 'attention'"):
        load_config(path)


def test_misspelt_section_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.lr=0.1"])


def test_bad_registry_value_names_the_closest():
    with pytest.raises(ConfigError, match=r"model\.norm.*did you mean 'rmsnorm'"):
        load_config(None, ["model.norm=rmsnrom"])


def test_bad_literal_value_lists_choices():
    with pytest.raises(ConfigError, match=r"train\.precision.*bf16"):
        load_config(None, ["train.precision=bf61"])


def test_bad_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=many"])


def test_overrides_parse_yaml_values_and_scientific_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    cfg = load_config(path, ["model.attention=standard", "train.batch_size=4", "data.target_shape=[8, 16, 16]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.attention == "standard"
    assert cfg.train.batch_size == 4
    assert cfg.data.target_shape == [8, 16, 16]


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["model.loss=siglip", "model.encoder_args={dim: 32}", "train.max_steps=3"])
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg
    assert isinstance(again, Config)


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["model.attention"])


PRESETS = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_names_itself(preset):
    cfg = load_config(str(preset))
    assert cfg.name == preset.stem
