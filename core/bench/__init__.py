"""Efficiency bench: params, GFLOPs, peak memory, visual-encoder forward / backward and training-step time.

One module per job: ``probes`` (FLOPs, wall time, peak tensor memory), ``model`` (one config or several side by
side), ``options`` (performance options, largest batch, patch embedding), ``data_wait`` (time a training step
waits on the real DataLoader), ``tables`` (which configs a table measures; markdown / CSV output) and
``reports`` (what each ``ctlab bench`` table runs and writes).
"""

from core.bench.model import (
    MLFLOW_METRICS,
    TIMES,
    BenchSubject,
    bench_to_mlflow_rows,
    compare,
    encoder_gflops,
    measure,
    paired_speedups,
    random_texts,
    ratios,
)

__all__ = ["MLFLOW_METRICS", "TIMES", "BenchSubject", "bench_to_mlflow_rows", "compare", "encoder_gflops", "measure",
           "paired_speedups", "random_texts", "ratios"]
