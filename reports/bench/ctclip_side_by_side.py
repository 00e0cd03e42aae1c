"""CT-CLIP's own CTViT against this suite's ``ctvit``, side by side in one process (training mode, fwd + bwd).

Usage (CT-CLIP's code is read from a checkout, as for tests/fixtures/ctclip/make_fixture.py)::

    PYTHONPATH=/tmp/ctclip-deps:. python reports/bench/ctclip_side_by_side.py /tmp/ctclip

Both encoders are built at the same config (dim 512, 8 heads × 32, depth
4 + 4, codebook 8192; patch 8, temporal patch 4 on a 1 × 48 × 96 × 96
volume by default), ours loaded with CT-CLIP's weights through
``core.convert`` (so both compute the same function), and timed alternately:
forward to the quantised tokens (CT-CLIP: ``return_encoded_tokens=True``),
``sum().backward()``, in training mode (VQ straight-through and EMA update),
warm-up then the median of the repeats. Writes
``reports/bench/<--name>.{md,csv}`` (default ``ctclip-side-by-side``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from core.config import ModelConfig
from core.convert import convert_state_dict
from core.encoders import create_encoder

HERE = Path(__file__).resolve().parent
FIXTURE_SCRIPT = HERE.parents[1] / "tests" / "fixtures" / "ctclip" / "make_fixture.py"


def _import_ctclip(root: Path):
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_ctclip(root)[0]


def ours_from(theirs: torch.nn.Module, attention: str, shape: tuple[int, int, int], patch: int, tpatch: int):
    """Our ctvit at the same config, holding CT-CLIP's weights."""
    cfg = ModelConfig(preset="ctclip", attention=attention, encoder_args={"patch": patch, "temporal_patch": tpatch})
    ours = create_encoder(cfg, shape)
    state = {f"visual_transformer.{k}": v for k, v in theirs.state_dict().items()}
    converted, acc = convert_state_dict(state, {f"image_encoder.{k}": v for k, v in ours.state_dict().items()})
    assert not acc.unknown and not acc.missing and not acc.mismatched, acc.summary()
    ours.load_state_dict({k.removeprefix("image_encoder."): v for k, v in converted.items()})
    return ours


def components(root: Path, repeats: int) -> pd.DataFrame:
    """Each part alone, CT-CLIP's module vs ours with the same weights, fwd + bwd (median ms): attention with the
    position bias on 24 slabs of 12 × 12 tokens, the PEG on a 2 × 12³ grid, the VQ (training mode, 8192 codes)."""
    import sys

    from core.layers.factorized import PEG, ContinuousPositionBias, QKNormAttention
    from core.layers.vq import VectorQuantizer

    attention = sys.modules["transformer_maskgit.attention"]
    from vector_quantize_pytorch import VectorQuantize

    x, tokens = torch.randn(24, 144, 512, requires_grad=True), torch.randn(2, 1728, 512, requires_grad=True)
    bias = ContinuousPositionBias(512, 8)(12, 12).detach()
    their_attn, our_attn = attention.Attention(dim=512, dim_head=32, heads=8), QKNormAttention(512, 8, 32, "standard",
                                                                                                 "layernorm")
    their_peg, our_peg = attention.PEG(512, causal=True), PEG(512)
    our_peg.conv.load_state_dict(their_peg.dsconv.state_dict())
    their_vq = VectorQuantize(dim=512, codebook_size=8192, use_cosine_sim=True).train()
    our_vq = VectorQuantizer(512, 8192).train()
    pairs = {"attention + position bias": (lambda t: their_attn(t, attn_bias=bias), lambda t: our_attn(t, bias)),
             "PEG": (lambda t: their_peg(t, shape=(2, 12, 12, 12)), lambda t: our_peg(t, (2, 12, 12, 12))),
             "VQ (training)": (lambda t: their_vq(t)[0], lambda t: our_vq(t)[0])}
    rows = []
    for name, (theirs, ours) in pairs.items():
        times: dict[str, list[float]] = {"theirs": [], "ours": []}
        for i in range(repeats + 1):
            for who, forward in (("theirs", theirs), ("ours", ours)):
                ms = step(forward, x if "VQ" not in name else tokens)
                if i:
                    times[who].append(ms)
        rows.append({"part": name, "ctclip_ms": round(statistics.median(times["theirs"]), 1),
                     "ours_ms": round(statistics.median(times["ours"]), 1),
                     "time_vs_ctclip": round(statistics.median(times["ours"]) / statistics.median(times["theirs"]),
                                             3)})
    del root
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A plain Markdown table."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def step(forward, x: torch.Tensor) -> float:
    start = time.perf_counter()
    forward(x).sum().backward()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ctclip_root", type=Path)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96])
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--temporal-patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--name", default="ctclip-side-by-side", help="report file name without extension")
    parser.add_argument("--components", action="store_true", help="time attention, PEG and VQ alone instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctvit_cls = _import_ctclip(args.ctclip_root)
    if args.components:
        frame = components(args.ctclip_root, args.repeats)
        frame.to_csv(HERE / f"{args.name}.csv", index=False)
        (HERE / f"{args.name}.md").write_text(
            "# CT-CLIP's modules vs ours, each part alone (fwd + bwd, fp32, CPU "
            f"{torch.get_num_threads()} threads, median of {args.repeats}, alternating)\n\n"
            + (components.__doc__ or "").split("\n", 1)[0] + "\n\n" + markdown(frame) + "\n")
        print(frame.to_string(index=False))
        return
    depth, height, _ = args.shape
    theirs = ctvit_cls(dim=512, codebook_size=8192, image_size=height, patch_size=args.patch,
                       temporal_patch_size=args.temporal_patch, spatial_depth=4, temporal_depth=4, dim_head=32,
                       heads=8).train()
    models = {
        "CT-CLIP CTViT (its code)": (theirs, lambda x: theirs(x, return_encoded_tokens=True)),
    }
    for attention in ("standard", "sdpa"):
        ours = ours_from(theirs, attention, tuple(args.shape), args.patch, args.temporal_patch).train()
        models[f"ctvit, {attention}"] = (ours, ours.forward_tokens)
    x = torch.randn(args.batch, 1, *args.shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.warmup + args.repeats):
        for name, (module, forward) in models.items():
            module.zero_grad(set_to_none=True)
            ms = step(forward, x)
            if i >= args.warmup:
                times[name].append(ms)
    used = sum(p.numel() for n, p in theirs.named_parameters()
               if not n.startswith(("to_pixels", "to_patch_emb_first_frame")) and "context_norm" not in n)
    base = statistics.median(times["CT-CLIP CTViT (its code)"])
    rows = []
    for name, (module, _) in models.items():
        median, params = statistics.median(times[name]), sum(p.numel() for p in module.parameters())
        rows.append({"encoder": name, "params": params, "params_used_by_forward": used if module is theirs else params,
                     "fwd_bwd_ms_median": round(median, 1), "fwd_bwd_ms_min": round(min(times[name]), 1),
                     "fwd_bwd_ms_max": round(max(times[name]), 1), "time_vs_ctclip": round(median / base, 3)})
    frame = pd.DataFrame(rows)
    setting = (f"batch {args.batch}, input 1×{'×'.join(map(str, args.shape))}, patch {args.patch} / temporal "
               f"{args.temporal_patch}, dim 512, 8 heads × 32, depth 4 + 4, codebook 8192, training mode, fp32, "
               f"CPU {torch.get_num_threads()} threads; {args.warmup} warm-up + median of {args.repeats} repeats, "
               "alternating; both hold the same weights")
    frame.to_csv(HERE / f"{args.name}.csv", index=False)
    (HERE / f"{args.name}.md").write_text(
        "# CT-CLIP's CTViT vs ctvit, side by side in one process\n\n" + setting + "\n\n"
        "params_used_by_forward leaves out what CT-CLIP builds but its encoder never runs (the decoder head "
        "to_pixels*, the first-frame patch embedding, the cross-attention context norms).\n\n"
        + markdown(frame) + "\n")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
