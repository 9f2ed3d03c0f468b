"""Masking benchmark on a LLaVA model of >= 300M parameters built from a config (random weights).

    .venv/bin/python benchmarks/masking.py

Measures, in one run: (a) computing every level of the default schedule (one sort per tensor) against
per-level baselines; (b) switching the live model between levels (one schedule step, and the largest jump) against one
in-memory copy of the masked weights and against loading that level's masked checkpoint from disk; (c) peak memory (RSS)
of the masker, of switching and of the streaming export against the model's own size.
Threads follow OMP_NUM_THREADS (default: all cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import harness
from masters.config import MaskConfig
from masters.io import aligned_table
from masters.mask_export import export_masked_checkpoints
from masters.masking import TeacherMasker, mask_levels, masked_parameter_names, zeroed_count

GiB = 2**30
QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs


def build_model() -> LlavaForConditionalGeneration:
    """CLIP-B/16-sized tower + a 16-layer, 1024-wide Llama: about 320M parameters."""
    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
    )
    text = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, tie_word_embeddings=True)).eval()


def rss() -> float:
    return harness.status_mb("VmRSS") * 2**20


def peak_rss() -> float:
    return harness.status_mb("VmHWM") * 2**20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_level_sort(weight: torch.Tensor, ratios: list[float]) -> list[float]:
    """Naive: a full torch.sort of |w| for every level."""
    out = []
    for ratio in ratios:
        ordered = torch.sort(weight.abs().flatten()).values
        out.append(float(ordered[zeroed_count(weight.numel(), ratio)]))
    return out


def per_level_quantile(weight: torch.Tensor, ratios: list[float]) -> list[float]:
    """Naive: torch.quantile per level (its input limit is 2^24 elements; larger tensors would need a sort)."""
    assert weight.numel() <= QUANTILE_MAX_NUMEL
    magnitudes = weight.abs().flatten()
    return [float(torch.quantile(magnitudes, zeroed_count(weight.numel(), r) / (weight.numel() - 1), interpolation="nearest")) for r in ratios]


def per_level_kthvalue(weight: torch.Tensor, ratios: list[float]) -> list[float]:
    """A stronger baseline: one O(n) selection per level."""
    magnitudes = weight.abs().flatten()
    return [float(magnitudes.kthvalue(zeroed_count(weight.numel(), r) + 1).values) for r in ratios]


def evict_from_page_cache(files: list[Path]) -> None:
    """Drop these files (only these) from the page cache, so the next read comes from the disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_into(model: torch.nn.Module, level_dir: Path) -> None:
    """Switch `model` to a level through the disk: from_pretrained, then copy its weights into the live model."""
    loaded = LlavaForConditionalGeneration.from_pretrained(level_dir)
    with torch.no_grad():
        for live, weights in zip(model.parameters(), loaded.parameters()):
            live.copy_(weights)


def main() -> None:
    # No options: the one command above; --help prints what it measures.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    model = build_model()
    params = dict(model.named_parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_any = max(p.numel() * p.element_size() for p in model.parameters())
    names = masked_parameter_names(model)
    masked = [params[name].detach() for name in names]
    masked_bytes = sum(t.numel() * t.element_size() for t in masked)
    largest = max(t.numel() * t.element_size() for t in masked)
    ratios = MaskConfig().ratios
    nonzero = [r for r in ratios if r > 0]
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {model_bytes / GiB:.2f} GiB float32; "
        f"masked: {len(names)} tensors, {masked_bytes / GiB:.2f} GiB; schedule {ratios}; torch threads {threads}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows: list[tuple[str, str, str]] = []

    # (c) first, while the heap holds nothing freed yet: memory of the masker (bands + temporaries)
    base_rss = rss()
    harness.reset_peak()
    start = time.perf_counter()
    masker = TeacherMasker(model, ratios)
    t_init = time.perf_counter() - start
    init_peak = peak_rss() - base_rss
    kept_bytes = masker.kept_bytes

    # (a) all levels of the schedule: ours on the whole model; against the per-level baselines on
    # text layer 0 + the projector (the baselines would take many minutes on the whole model).
    t_ours_all = timed(lambda: [mask_levels(t, ratios) for t in masked])
    subset = [params[n].detach() for n in names if "language_model.layers.0." in n or "multi_modal_projector" in n]
    for t in subset[:4]:  # same λ as a baseline (our bound is the float just below λ)
        below = [float(torch.nextafter(torch.tensor(lam), torch.tensor(0.0))) for lam in per_level_kthvalue(t, nonzero)]
        assert [level.bound for level in mask_levels(t, nonzero)] == below
    methods = {
        "ours": lambda: [mask_levels(t, ratios) for t in subset],
        "torch.sort per level": lambda: [per_level_sort(t, nonzero) for t in subset],
        "torch.quantile per level": lambda: [per_level_quantile(t, nonzero) for t in subset],
        "torch.kthvalue per level": lambda: [per_level_kthvalue(t, nonzero) for t in subset],
    }
    level_times = {name: [] for name in methods}
    for _ in range(2):  # interleaved, best of two: the machine is shared
        for name, method in methods.items():
            level_times[name].append(timed(method))
    best = {name: min(times) for name, times in level_times.items()}
    rows += [
        ("all levels, whole model (ours: one sort per tensor)", f"{t_ours_all:.2f} s", ""),
        (f"all levels, text layer 0 + projector ({sum(t.numel() for t in subset) / 1e6:.0f}M weights), ours", f"{best['ours']:.2f} s", "1.00x"),
    ]
    rows += [(f"  baseline: {name}", f"{best[name]:.2f} s", f"ours {best[name] / best['ours']:.1f}x faster") for name in list(methods)[1:]]
    rows.append(("TeacherMasker(...): all levels + bands", f"{t_init:.2f} s", ""))

    # (b) switching vs one in-memory copy of the masked weights, interleaved. The curriculum moves one
    # step at a time (0.2 -> 0.15 -> ... -> 0); the jump 0 <-> 0.2 is the largest switch there is.
    buffers = [torch.empty_like(t) for t in masked]
    [b.copy_(t) for b, t in zip(buffers, masked)]  # fault the buffers in before measuring the peak
    copy_times, step_times, jump_up_times, jump_down_times = [], [], [], []
    masker.set_mask_ratio(0.0)
    harness.reset_peak()
    before_switch = rss()
    for _ in range(4):
        copy_times.append(timed(lambda: [b.copy_(t) for b, t in zip(buffers, masked)]))
        jump_up_times.append(timed(lambda: masker.set_mask_ratio(ratios[0])))
        for ratio in ratios[1:]:
            step_times.append(timed(lambda: masker.set_mask_ratio(ratio)))
        masker.set_mask_ratio(ratios[0])
        jump_down_times.append(timed(lambda: masker.set_mask_ratio(0.0)))
    switch_peak = peak_rss() - before_switch
    buffers.clear()  # free the 1 GiB of copies before the export is measured
    t_copy, t_step, t_up, t_down = (
        statistics.median(times) for times in (copy_times, step_times, jump_up_times, jump_down_times)
    )
    t_switch = max(t_up, t_down)  # the disk comparison below uses the largest switch
    rows += [
        ("copy of the masked weights in memory (baseline), median", f"{t_copy * 1e3:.0f} ms", "1.00x"),
        ("set_mask_ratio, one schedule step (e.g. 0.2 -> 0.15), median", f"{t_step * 1e3:.0f} ms", f"{t_step / t_copy:.2f}x the copy"),
        (f"set_mask_ratio, jump 0 -> {ratios[0]:g}, median", f"{t_up * 1e3:.0f} ms", f"{t_up / t_copy:.2f}x the copy"),
        (f"set_mask_ratio, jump {ratios[0]:g} -> 0, median", f"{t_down * 1e3:.0f} ms", f"{t_down / t_copy:.2f}x the copy"),
    ]

    # export every level (streaming), then reach level 0.2 through the disk instead
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        source = Path(tmp) / "source"
        masker.set_mask_ratio(0.0)
        model.save_pretrained(source, max_shard_size="1GB")
        before_export = rss()
        harness.reset_peak()
        out_dirs = {r: Path(tmp) / "masked" / str(r) for r in ratios}
        t_export = timed(lambda: export_masked_checkpoints(source, out_dirs, max_shard_bytes=2**30))
        export_peak = peak_rss() - before_export
        level_dir = out_dirs[0.2]
        t_lazy = min(timed(lambda: LlavaForConditionalGeneration.from_pretrained(level_dir)) for _ in range(2))
        masker.set_mask_ratio(0.0)
        t_warm = min(timed(lambda: load_into(model, level_dir)) for _ in range(2))
        evict_from_page_cache(sorted(level_dir.glob("*.safetensors")))
        t_cold = timed(lambda: load_into(model, level_dir))
        via_disk = {k: v.clone() for k, v in model.state_dict().items()}
        masker.set_mask_ratio(0.2)
        assert all(torch.equal(via_disk[k], v) for k, v in model.state_dict().items()), "disk level != live level"
        del via_disk
    rows += [
        ("from_pretrained(level dir) alone, warm cache (lazy mmap)", f"{t_lazy * 1e3:.0f} ms",
         f"jump {t_lazy / t_switch:.1f}x, step {t_lazy / t_step:.1f}x faster"),
        ("from_pretrained + copy into live model, warm cache", f"{t_warm * 1e3:.0f} ms",
         f"jump {t_warm / t_switch:.1f}x, step {t_warm / t_step:.1f}x faster"),
        ("from_pretrained + copy into live model, cold cache", f"{t_cold * 1e3:.0f} ms",
         f"jump {t_cold / t_switch:.1f}x, step {t_cold / t_step:.1f}x faster"),
        (f"export_masked_checkpoints, all {len(ratios)} levels", f"{t_export:.1f} s", f"{len(ratios) * model_bytes / GiB / t_export:.2f} GiB/s written"),
    ]

    rows += [
        ("peak RSS added by TeacherMasker(...)", f"{init_peak / GiB:.2f} GiB",
         f"{init_peak / model_bytes:.2f}x model (a dense copy would be {masked_bytes / model_bytes:.2f}x); "
         f"largest tensor {largest / 2**20:.0f} MiB"),
        ("memory kept by the masker (band positions + values)", f"{kept_bytes / GiB:.2f} GiB", f"{kept_bytes / model_bytes:.2f}x model"),
        ("peak RSS added by switching", f"{switch_peak / 2**20:.0f} MiB", f"{switch_peak / model_bytes:.3f}x model"),
        ("peak RSS added by export (all levels)", f"{export_peak / 2**20:.0f} MiB",
         f"{export_peak / model_bytes:.2f}x model; {export_peak / largest_any:.1f}x largest checkpoint tensor ({largest_any / 2**20:.0f} MiB)"),
    ]
    print(f"\nload average after the run {os.getloadavg()[0]:.1f}")
    print(aligned_table(rows, right_aligned={1}))


if __name__ == "__main__":
    main()
