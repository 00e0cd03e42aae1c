import math

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from core.bench.model import bench_to_mlflow_rows, compare, encoder_gflops, measure
from core.bench.probes import count_flops, gflops, peak_increase
from core.bench.tables import paper_reference
from core.cli import main
from core.config import config_to_dict, flatten, load_config, save_config
from core.layers.attention import flash_unavailable_reason
from core.model import build_model
from core.registry import ENCODERS, ConfigError
from core.tracking import find_runs
from experiments.matrix import load_matrix
from tests.conftest import TINY_OVERRIDES
from tests.data_fixtures import SHAPE, SPACING, shared_synthetic

FAST = {"repeats": 2, "warmup": 1, "device": "cpu", "progress": False}


def _cfg(overrides, *extra):
    return load_config(None, [*overrides, *extra])


@pytest.fixture(scope="module")
def comparison():
    configs = {
        "SA+GELU+LN": _cfg(TINY_OVERRIDES, "model.attention=standard", "model.mlp=gelu", "name=base"),
        "SDPA+SwiGLU+RMS": _cfg(TINY_OVERRIDES, "model.attention=sdpa", "model.mlp=swiglu", "model.norm=rmsnorm"),
    }
    return configs, compare(configs, "SA+GELU+LN", batch_size=2, **FAST)


def test_linear_flops_are_two_in_out_batch():
    layer, batch = nn.Linear(24, 40), 7
    assert count_flops(layer, torch.randn(batch, 24)) == 2 * 24 * 40 * batch
    assert gflops(layer, torch.randn(batch, 24)) == 2 * 24 * 40 * batch / 1e9


def test_ctvit_gflops_match_the_transformer_formula(tiny_overrides):
    """Tiny CT-ViT at 16×32×32: a 4×4×4 token grid, dim 64, 4 heads × 16, GEGLU of width int(4·2/3·64) = 170,
    2 + 2 layers, each with a PEG; the position-bias MLP over the 16 × 16 spatial offsets; VQ over 512 codes."""
    cfg = _cfg(tiny_overrides)
    tokens, dim, inner, hidden, patch_dim, (t, h, w) = 64, 64, 64, 170, 4 * 8 * 8, (4, 4, 4)
    patch_embed = 2 * tokens * patch_dim * dim
    per_layer = tokens * (2 * dim * 3 * inner + 2 * inner * dim + 2 * 3 * dim * hidden)  # q + kv, out; GEGLU
    spatial_attn = t * 2 * 2 * (h * w) ** 2 * inner  # QKᵀ and AV over each slab's h·w tokens
    temporal_attn = h * w * 2 * 2 * t**2 * inner
    peg = 2 * 27 * dim * tokens  # depthwise 3×3×3
    position_bias = 2 * (h * w) ** 2 * (2 * dim + dim * dim + dim * 4)  # MLP 2 → 64 → 64 → 4 heads
    vq = 2 * tokens * dim * 512  # cosine similarity to every code
    expected = (patch_embed + 4 * per_layer + 2 * spatial_attn + 2 * temporal_attn + 4 * peg + position_bias
                + vq)
    assert encoder_gflops(cfg) * 1e9 == pytest.approx(expected, rel=1e-12)


def test_gflops_do_not_depend_on_the_attention_kernel(tiny_overrides):
    """The same math must count the same, although torch's fused CPU sdpa kernel has no FLOP formula."""
    counts = {a: encoder_gflops(_cfg(tiny_overrides, f"model.attention={a}")) for a in ("standard", "sdpa", "flash")}
    assert counts["standard"] == counts["sdpa"] == counts["flash"]


def test_measure_reports_positive_times_and_exact_param_counts(tiny_overrides):
    cfg = _cfg(tiny_overrides)
    record = measure(cfg, batch_size=2, **FAST)
    model = build_model(cfg)
    assert record["params_total"] == record["params_trainable"] == sum(p.numel() for p in model.parameters())
    assert record["image_params_total"] == sum(p.numel() for p in model.image_encoder.parameters())
    assert record["image_params_total"] < record["params_total"]
    for key in ("visual_fwd_ms", "visual_bwd_ms", "step_ms", "peak_memory_mb", "gflops", "samples_per_s"):
        assert record[key] > 0 and math.isfinite(record[key]), key
    assert record["samples_per_s"] == pytest.approx(2 / (record["step_ms"] / 1e3))
    assert record["repeats"] == 2 and record["input_shape"] == "16x32x32"


def test_compare_gives_both_configs_and_ratios_of_their_figures(comparison):
    _, out = comparison
    base, other = out["results"]["SA+GELU+LN"], out["results"]["SDPA+SwiGLU+RMS"]
    assert (base["attention"], base["mlp"]) == ("standard", "gelu")
    assert (other["attention"], other["norm"], other["mlp"]) == ("sdpa", "rmsnorm", "swiglu")
    ratio = out["ratios"]["SDPA+SwiGLU+RMS"]
    assert ratio["memory_ratio"] == other["peak_memory_mb"] / base["peak_memory_mb"]
    assert ratio["step_speedup"] == base["step_ms"] / other["step_ms"]
    assert ratio["visual_fwd_ratio"] == other["visual_fwd_ms"] / base["visual_fwd_ms"]
    assert ratio["visual_bwd_ratio"] == other["visual_bwd_ms"] / base["visual_bwd_ms"]
    assert set(out["ratios"]["SA+GELU+LN"].values()) == {1.0}


def test_compare_rejects_an_unknown_baseline(tiny_overrides):
    with pytest.raises(ConfigError, match="baseline 'nope' is not among the configs"):
        compare({"a": _cfg(tiny_overrides)}, "nope", **FAST)


def test_mlflow_rows_follow_the_efficiency_contract(comparison):
    configs, out = comparison
    rows = bench_to_mlflow_rows(out, matrix="zoo")
    assert [r["tags"]["cell_label"] for r in rows] == list(configs)
    for row, (label, cfg) in zip(rows, configs.items(), strict=True):
        assert row["tags"]["ctlab.kind"] == "efficiency" and row["tags"]["matrix"] == "zoo"
        assert {k: v for k, v in row["params"].items() if k.startswith("config.")} == {
            f"config.{k}": v for k, v in flatten(config_to_dict(cfg)).items()}
        assert set(row["metrics"]) == {"params_total", "params_trainable", "gflops", "peak_memory_mb",
                                       "visual_fwd_ms", "visual_bwd_ms", "step_ms", "step_ms_min", "step_ms_max"}
        result = out["results"][label]
        assert row["metrics"]["step_ms"] == result["step_ms"]
        low, high = row["metrics"]["step_ms_min"], row["metrics"]["step_ms_max"]
        assert (low, high) == (result["step_ms_min"], result["step_ms_max"]) and low <= result["step_ms"] <= high


def test_cpu_peak_memory_is_the_peak_of_live_tensor_bytes():
    def work():
        a, b = torch.empty(1000), torch.empty(2000)  # 4000 + 8000 bytes live together
        del a
        return torch.empty(500), b

    _, peak = peak_increase(work, torch.device("cpu"))
    assert peak == 12_000


def test_cpu_peak_memory_grows_with_batch_size(tiny_overrides):
    """At 32×64×64 the activations outweigh the optimizer step's temporaries, so the peak follows the batch."""
    cfg = _cfg(tiny_overrides, "data.target_shape=[32, 64, 64]")
    small = measure(cfg, batch_size=1, repeats=1, warmup=0, device="cpu")["peak_memory_mb"]
    large = measure(cfg, batch_size=4, repeats=1, warmup=0, device="cpu")["peak_memory_mb"]
    extra_inputs_mb = 3 * 32 * 64 * 64 * 4 / 2**20
    assert large - small > 10 * extra_inputs_mb  # activations of three more volumes, not just the volumes


def test_bench_train_writes_both_configs_and_their_ratios(tiny_overrides, tmp_path, capsys):
    base = save_config(_cfg(tiny_overrides, "model.attention=standard", "name=sa"), tmp_path / "sa.yaml")
    new = save_config(_cfg(tiny_overrides, "model.mlp=swiglu", "model.norm=rmsnorm", "name=modern"),
                      tmp_path / "modern.yaml")
    rc = main(["bench", "train", str(new), "--vs", str(base), "--repeats", "1", "--warmup", "1",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    assert "memory ratio" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "train-modern-vs-sa.csv").set_index("label")
    assert list(frame.index) == ["sa", "modern"]
    assert frame.loc["modern", "memory_ratio"] == pytest.approx(
        frame.loc["modern", "peak_memory_mb"] / frame.loc["sa", "peak_memory_mb"])
    assert frame.loc["modern", "step_speedup"] == pytest.approx(
        frame.loc["sa", "step_ms"] / frame.loc["modern", "step_ms"])
    assert (tmp_path / "train-modern-vs-sa.md").read_text().count("| sa ") == 1


def test_bench_model_matrix_benches_every_configuration_once_against_the_baseline(tmp_path):
    base = {"model": {"preset": "tiny", "text_encoder": "tiny-random", "latent_dim": 32},
            "data": {"target_shape": [16, 32, 32]}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "mlps", "base": base, "axes": {"model.mlp": ["gelu", "geglu"]},
                                    "repeats": 2, "baseline": {"model.mlp": "geglu"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["bench", "model", "--matrix", str(path), "--repeats", "1", "--warmup", "1", "--device", "cpu",
               "--no-progress", "--out", str(tmp_path), "--track", "--tracking-uri", uri])
    assert rc == 0
    frame = pd.read_csv(tmp_path / "model-mlps.csv").set_index("mlp")
    assert sorted(frame.index) == ["geglu", "gelu"]  # seeds are not benchmarked twice
    assert frame.loc["geglu", "status"] == "baseline" and frame.loc["gelu", "status"] == "ok"
    assert frame.loc["gelu", "step_speedup"] == pytest.approx(
        frame.loc["geglu", "step_ms"] / frame.loc["gelu", "step_ms"])
    runs = find_runs(uri, "tags.matrix = 'mlps' and tags.`ctlab.kind` = 'efficiency'", experiment="efficiency")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    seed0 = {c.cell_id for c in load_matrix(path).cells if c.config.train.seed == 0}
    assert {r.data.tags["cell_id"] for r in runs} == seed0
    logged = {r.data.params["config.model.mlp"]: r.data.metrics for r in runs}
    assert logged["gelu"]["step_ms"] == pytest.approx(frame.loc["gelu", "step_ms"])
    assert logged["geglu"]["params_total"] > 0


def test_bench_encoders_flops_only_at_the_dcformer_papers_input(tmp_path, capsys):
    """At the paper's 256×512×512 input our DCFormer GMACs (GFLOPs / 2) come within 10 % of its "GFLOPs"."""
    rc = main(["bench", "encoders", "--flops-only", "--shape", "256", "512", "512", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    assert "paper GFLOPs" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "encoders-tiny.csv").set_index("label")
    assert set(frame.index) == set(ENCODERS.names())
    assert frame.loc["ctvit", "status"] == "ok" and pd.isna(frame.loc["ctvit", "paper"])  # tiny ≠ the paper's
    dcformers = frame[frame.index.str.startswith("dcformer")]
    assert len(dcformers) == 3 and (dcformers["paper"].str.startswith("DCFormer")).all()
    assert ((dcformers["gmacs"] / dcformers["paper_gflops"] - 1).abs() < 0.10).all()


def test_paper_rows_only_for_the_papers_configurations():
    assert paper_reference("ctvit", "ctclip") == ("CT-ViT", 101.1, 160.5)
    assert paper_reference("convnext3d", "base") == ("ConvNeXt tiny", 31.59, 156.31)
    assert paper_reference("dcformer_naive", "default") == ("DCFormer naive", 5.85, 49.48)
    assert paper_reference("ctvit", "tiny") is None and paper_reference("convnext3d", "tiny") is None


@pytest.mark.slow
def test_bench_zoo_prints_one_row_per_combination(tmp_path, capsys):
    rc = main(["bench", "--repeats", "1", "--warmup", "1", "--shape", "16", "32", "32", "--batch", "1",
               "--device", "cpu", "--no-progress", "--override", "model.latent_dim=32", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "attention" not in line]
    reason = flash_unavailable_reason()
    measured = [r for r in rows if "skipped" not in r]
    skipped = [r for r in rows if "skipped" in r]
    assert len(measured) == (12 if reason else 18)
    assert len(skipped) == (6 if reason else 0)
    assert all(r.startswith("| flash") and reason in r for r in skipped)
    frame = pd.read_csv(tmp_path / "zoo.csv")
    assert len(frame) == 18
    assert set(zip(frame["norm"], frame["mlp"], strict=True)) == {
        (n, m) for n in ("layernorm", "rmsnorm") for m in ("gelu", "swiglu", "geglu")}


def test_bench_data_prints_the_pipeline_figures(tmp_path_factory, tmp_path, capsys):
    root = shared_synthetic(tmp_path_factory)
    rc = main(["bench", "data", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
               f"data.target_shape={list(SHAPE)}", f"data.target_spacing={list(SPACING)}", "-n", "3",
               "--out", str(tmp_path)])
    assert rc == 0
    assert "cached_volumes_per_s" in capsys.readouterr().out
    figures = pd.read_csv(tmp_path / "data-train.csv").set_index("metric")["value"]
    assert int(figures["volumes"]) == 3 and float(figures["cached_volumes_per_s"]) > 0


def _data_overrides(root, cache):
    return [f"data.root={root}", f"data.cache_dir={cache}", f"data.target_shape={list(SHAPE)}",
            f"data.target_spacing={list(SPACING)}", "train.batch_size=2"]


def test_bench_train_applies_the_candidate_toggles_and_tracks_both(tiny_overrides, tmp_path):
    base = save_config(_cfg(tiny_overrides, "model.attention=standard", "name=sa"), tmp_path / "sa.yaml")
    new = save_config(_cfg(tiny_overrides, "model.mlp=swiglu", "model.norm=rmsnorm", "name=modern"),
                      tmp_path / "modern.yaml")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["bench", "train", str(new), "--vs", str(base), "--precision", "bf16", "--grad-checkpointing",
               "--candidate", "model.encoder_args.patch_embed=conv", "--repeats", "2", "--warmup", "1",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path), "--track",
               "--tracking-uri", uri])
    assert rc == 0
    frame = pd.read_csv(tmp_path / "train-modern-vs-sa.csv").set_index("label")
    assert frame.loc["modern", "precision"] == "bf16" and frame.loc["sa", "precision"] == "fp32"
    assert frame.loc["modern", "step_speedup_min"] <= frame.loc["modern", "step_speedup"]
    assert frame.loc["modern", "step_speedup"] <= frame.loc["modern", "step_speedup_max"]
    assert frame.loc["modern", "samples_per_s"] == pytest.approx(2 / (frame.loc["modern", "step_ms"] / 1e3))
    runs = find_runs(uri, "tags.`ctlab.kind` = 'efficiency'", experiment="efficiency")
    params = {r.data.tags["cell_label"]: r.data.params for r in runs}
    assert set(params) == {"sa", "modern"}
    assert params["modern"]["config.model.grad_checkpointing"] == "True"
    assert params["modern"]["config.train.precision"] == "bf16"
    assert params["sa"]["config.model.grad_checkpointing"] == "False"


def test_data_wait_times_real_steps_from_the_cached_loader(tiny_overrides, tmp_path_factory, tmp_path):
    from core.bench.data_wait import data_wait

    root = shared_synthetic(tmp_path_factory)
    cfg = _cfg(tiny_overrides, *_data_overrides(root, tmp_path / "cache"), "name=tiny")
    rows = data_wait(cfg, workers=(0, 1), steps=6, warmup=1, device="cpu", progress=False)
    assert [r["num_workers"] for r in rows] == [0, 1]
    assert [r["persistent_workers"] for r in rows] == [False, True]
    for row in rows:
        assert row["steps_per_epoch"] == 5 and row["steps"] == 6  # an epoch start falls inside the timed steps
        assert 0 < row["wait_fraction"] < 1
        assert 0 < row["data_wait_ms"] <= row["data_wait_ms_max"]
        assert row["data_wait_ms"] < row["step_ms"]
        assert row["samples_per_s"] > 0


def test_data_wait_rejects_a_batch_larger_than_the_split(tiny_overrides, tmp_path_factory, tmp_path):
    from core.bench.data_wait import data_wait

    root = shared_synthetic(tmp_path_factory)
    cfg = _cfg(tiny_overrides, *_data_overrides(root, tmp_path / "cache"), "train.batch_size=64")
    with pytest.raises(ConfigError, match="fewer than one batch of train.batch_size=64"):
        data_wait(cfg, workers=(0,), steps=1, device="cpu", progress=False)


@pytest.mark.slow
def test_bench_train_data_writes_the_wait_fraction_per_setting(tiny_overrides, tmp_path_factory, tmp_path):
    root = shared_synthetic(tmp_path_factory)
    data = _data_overrides(root, tmp_path / "cache")
    base = save_config(_cfg(tiny_overrides, *data, "model.attention=standard", "name=sa"), tmp_path / "sa.yaml")
    new = save_config(_cfg(tiny_overrides, *data, "name=modern"), tmp_path / "modern.yaml")
    rc = main(["bench", "train", str(new), "--vs", str(base), "--data", "--workers", "0", "1", "--data-steps", "3",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    frame = pd.read_csv(tmp_path / "train-modern-vs-sa-data.csv")
    assert list(zip(frame["label"], frame["num_workers"], strict=True)) == [("sa", 0), ("sa", 1), ("modern", 0),
                                                                             ("modern", 1)]
    assert frame["wait_fraction"].between(0, 1).all()
    assert "wait fraction" in (tmp_path / "train-modern-vs-sa-data.md").read_text()


def test_bench_options_reads_each_option_against_the_modern_row(tmp_path, capsys):
    rc = main(["bench", "options", "--shape", "16", "32", "32", "--options", "conv-patch", "--batch", "1",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path),
               "--override", "model.latent_dim=32"])
    assert rc == 0
    assert "pays" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "options-ctvit-tiny-16x32x32-fp32-cpu.csv").set_index("label")
    assert list(frame.index) == ["SA+GELU+LN", "SDPA+SwiGLU+RMS", "SDPA+SwiGLU+RMS +conv-patch"]
    row, modern = frame.loc["SDPA+SwiGLU+RMS +conv-patch"], frame.loc["SDPA+SwiGLU+RMS"]
    assert row["memory_vs_modern"] == pytest.approx(row["peak_memory_mb"] / modern["peak_memory_mb"])
    assert row["speedup_vs_modern"] == pytest.approx(modern["step_ms"] / row["step_ms"])
    assert row["pays"] in {"no", "memory", "speed", "memory + speed"}
    assert pd.isna(modern["pays"])
