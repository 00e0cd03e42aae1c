from pathlib import Path

import pytest
import yaml

from core.registry import ConfigError
from experiments.matrix import cell_label, load_matrix

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BASE = {"model": {"preset": "tiny", "text_encoder": "tiny-random"}, "data": {"target_shape": [16, 32, 32]}}


def _write(tmp_path, data):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_smoke_matrix_has_the_papers_sixteen_configurations_with_two_seeds_each():
    matrix = load_matrix(EXPERIMENTS / "smoke.yaml")
    assert len(matrix.cells) == 32 and len(matrix.runnable) == 32
    assert len({c.cell_id for c in matrix.cells}) == 32
    assert sorted(c.config.train.seed for c in matrix.cells) == [0] * 16 + [1] * 16
    assert matrix.baseline_cell().label.startswith("SA+GEGLU+LN, softmax")
    labels = {c.label.split(", frozen_text")[0] for c in matrix.cells}
    assert labels >= {"SDPA+SwiGLU+RMSNorm, sigmoid", "SA+GEGLU+LN, sigmoid"} and len(labels) == 16


def test_excludes_includes_and_repeats(tmp_path):
    path = _write(tmp_path, {
        "name": "m", "base": BASE,
        "axes": {"model.attention": ["standard", "sdpa"], "model.loss": ["clip", "siglip"]},
        "exclude": [{"model.attention": "standard", "model.loss": "siglip"}],
        "include": [{"model.attention": "sdpa", "model.loss": "clip", "model.norm": "rmsnorm"}],
        "repeats": 2,
    })
    matrix = load_matrix(path)
    assert len(matrix.cells) == (3 + 1) * 2
    seeds = sorted(c.config.train.seed for c in matrix.cells)
    assert seeds == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not any(c.config.model.attention == "standard" and c.config.model.loss == "siglip" for c in matrix.cells)


def test_cell_id_is_stable_and_ignores_where_runs_are_logged(tmp_path):
    a = load_matrix(_write(tmp_path, {"name": "a", "base": BASE, "axes": {"model.mlp": ["gelu", "swiglu"]}}))
    other = dict(BASE, tracking={"uri": "sqlite:///elsewhere.db"})
    b = load_matrix({"name": "b", "base": other, "axes": {"model.mlp": ["gelu", "swiglu"]}})
    assert [c.cell_id for c in a.cells] == [c.cell_id for c in b.cells]
    assert a.cells[0].cell_id != a.cells[1].cell_id


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "m", "base": BASE, "axis": {"model.mlp": ["gelu"]}}, "did you mean 'axes'"),
    ({"name": "m", "base": BASE, "axes": {"model.mlpp": ["gelu"]}}, "did you mean 'mlp'"),
    ({"name": "m", "base": BASE, "axes": {"model.mlp": ["gelu", "swiglo"]}}, "did you mean 'swiglu'"),
    ({"name": "m", "base": BASE, "axes": {"model.mlp": ["gelu"]}, "baseline": {"model.norm": "rmsnorm"}},
     "baseline key"),
    ({"name": "m", "base": BASE, "axes": {"tracking.experiment": ["a", "b"]}}, "tracking.experiment cannot vary"),
    ({"name": "m", "base": BASE, "include": [{"model.mlp": "gelu", "tracking.uri": "sqlite:///x.db"}]},
     "tracking.uri cannot vary"),
])
def test_bad_matrix_fails_before_anything_runs(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_matrix(_write(tmp_path, data))


def test_labels_name_components_like_the_paper():
    matrix = load_matrix(EXPERIMENTS / "paper.yaml")
    assert [c.label for c in matrix.cells] == ["SA+GEGLU+LN, softmax", "SA+GEGLU+LN, sigmoid",
                                               "FA+SwiGLU+RMSNorm, sigmoid"]
    assert cell_label(matrix.cells[0].config) == matrix.cells[0].label


def test_encoder_matrix_skips_axes_an_encoder_lacks():
    matrix = load_matrix(EXPERIMENTS / "encoders.yaml")
    assert len(matrix.runnable) == 8
    [skipped] = [c for c in matrix.cells if not c.runnable]
    assert skipped.config.model.encoder == "convnext3d"
    assert "has no attention axis" in skipped.skip_reason
    assert matrix.baseline_cell().config.model.encoder == "ctvit"
