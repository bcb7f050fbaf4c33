"""Time the zero-shot pipeline per stage on real-size architectures with random weights.

Usage (from the repository root):

    PYTHONPATH=. python bench/bench_pipeline.py            # full run, appends to docs/benchmarks.md
    PYTHONPATH=. python bench/bench_pipeline.py --quick    # smaller settings to check the script

Models: BiomedCLIP's architecture (timm ViT-B/16 image tower, BERT-base text tower, 512-d joint space, 256-token
context) and SAM ViT-B, both with seeded random weights written once into a cache folder (see
`real_size_models`). Every matrix product has the size of the pre-trained models, so the seconds are those of the
real models. Masks, box counts and CLIP scores are not.

What one run measures, side by side on the same machine and image:

* the matrix-product rate of the machine (``torch.mm``) in float32 and bfloat16;
* gScoreCAM with one masked forward per call against batched forwards, in float32 and bfloat16;
* a plain implementation of the 2D pipeline (float32, one masked forward at a time, the prompt encoded per call,
  and segment-anything's SAM image embedding computed once per box) against the library's pipeline in float32 and
  in bfloat16;
* the compute floor: the FLOPs of the bfloat16 pipeline (counted with `torch.utils.flop_counter.FlopCounterMode`
  on the real calls) divided by the measured matrix-product rate;
* SAM's image embedding with segment-anything's own encoder forward against the piecewise attention of
  `MedCLIPSAMLib.sam_encoder`, in float32 and bfloat16;
* bfloat16 gScoreCAM and SAM's image embedding with one thread against the run's thread count;
* fidelity of bfloat16 against float32 on the sample images: Dice of the masks, Pearson correlation of the
  saliency maps;
* a volume of 40 slices, where a presence rule (a CLIP-score threshold) lets 10 slices through, against running
  every slice.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_size_models import build_random_biomedclip, build_random_sam_checkpoint  # noqa: E402

from MedCLIPSAMLib import imaging, saliency  # noqa: E402
from MedCLIPSAMLib.boxes import boxes_from_mask  # noqa: E402
from MedCLIPSAMLib.crf import crf_refine  # noqa: E402
from MedCLIPSAMLib.io import read_image, read_volume  # noqa: E402
from MedCLIPSAMLib.metrics import dice  # noqa: E402
from MedCLIPSAMLib.models import CPU_BFLOAT16_FLAGS, cpu_flags, load_clip, load_sam  # noqa: E402
from MedCLIPSAMLib.pipeline import ZeroShotConfig, ZeroShotSegmenter, extract_slice  # noqa: E402
from MedCLIPSAMLib.sam import SamBoxSegmenter  # noqa: E402

logger = logging.getLogger("bench_pipeline")

PROMPT_2D = "breast tumor"
PROMPT_VOLUME = "brain glioma"
IMAGE_RELATIVE = Path("breast_ultrasound") / "images" / "benign (101).png"
SAMPLE_FOLDER = REPOSITORY_ROOT / "Resources" / "SampleData"
SAMPLE_IMAGES = (
    ("breast_ultrasound_benign_101.png", "breast tumor"),
    ("chest_xray_pneumocystis_cyst.jpg", "lungs"),
    ("brain_mri_13.png", "brain tumor"),
)
"""The README's sample images and prompts: the fidelity target is measured on these."""
EXTRA_FIDELITY_IMAGE = (Path("chest_xray") / "images" / "kjr-21-e25-g001-l-a.jpg", "lung opacity")
"""A further X-ray from the shared data set (not bundled), reported beside the sample images when present."""
VOLUME_RELATIVE = Path("volumes") / "pyradiomics_brain1" / "brain1_image.nrrd"

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

MM_SIDE = 2048
"""Side of the square matrices timed with torch.mm for the matrix-product rate."""


# --------------------------------------------------------------------------------------------------------------------
# Machine and helpers


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def data_folder() -> Path:
    """Return the shared data folder next to the repository, else the bundled test data."""
    shared = REPOSITORY_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else REPOSITORY_ROOT / "Testing" / "Data"


def timed(function, *args, **kwargs):
    """Call `function` and return ``(result, seconds)``."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def matmul_rate(dtype: torch.dtype, side: int = MM_SIDE, repeats: int = 5) -> float:
    """Return the best ``torch.mm`` rate over `repeats` products of two side x side matrices, in FLOP/s."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(side, side, generator=generator).to(dtype)
    right = torch.randn(side, side, generator=generator).to(dtype)
    torch.mm(left, right)
    best = float("inf")
    for _ in range(repeats):
        _, seconds = timed(torch.mm, left, right)
        best = min(best, seconds)
    return 2.0 * side**3 / best


def pearson(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation of two maps over all pixels: 1 for two equal constant maps, NaN for one constant map.

    Two equal constant maps (for example both all zero) count as 1 because the two runs agree exactly.
    """
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if a.std() == 0.0 or b.std() == 0.0:
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def count_flops(function, *args, **kwargs):
    """Run `function` under FlopCounterMode and return ``(result, flops)``.

    The CPU flash-attention kernel that timm's fused attention reaches is added to the counter's table with the
    formula that torch uses for the other scaled-dot-product kernels, because torch 2.14 does not list it.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    extra = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        extra[cpu_flash] = cpu_flash_flops
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    # The counter's per-module tracker installs backward hooks that make torch.autograd.grad, which gScoreCAM
    # calls on a detached leaf, fail ("A leaf node was passed to _will_engine_execute_node"). Only the total is
    # needed, so a tracker that files every count under "Global" replaces it. NOTE: this relies on the private
    # attribute mod_tracker of torch 2.14's FlopCounterMode.
    counter.mod_tracker = _GlobalOnlyTracker()
    with counter:
        result = function(*args, **kwargs)
    return result, int(counter.get_total_flops())


class _GlobalOnlyTracker:
    """Stand-in for FlopCounterMode's module tracker that installs no hooks."""

    parents = {"Global"}
    is_bw = False

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


# --------------------------------------------------------------------------------------------------------------------
# 2D: plain implementation and library pipeline


def plain_pipeline(clip, sam_model, image: np.ndarray, prompt: str, config: ZeroShotConfig, measured_boxes: int):
    """Run the pipeline's steps the plain way and return ``(seconds per stage, box count, boxes timed)``.

    Plain means: float32 models, one masked forward per gScoreCAM call, the prompt encoded in this call, and the
    SAM image embedding computed again for every box. The SAM stage is timed on the first `measured_boxes` boxes
    and scaled linearly to the box count, because each box repeats the same embedding and one-box decoding.
    """
    from segment_anything import SamPredictor

    stages: dict[str, float] = {}
    start = time.perf_counter()
    rgb = imaging.to_rgb_uint8(image, window=config.window)
    tensor, letterbox = imaging.clip_input(rgb, clip.mean, clip.std, size=clip.image_size)
    with torch.no_grad():
        tokens = clip.tokenizer([prompt]).to(clip.device)
        text = torch.nn.functional.normalize(clip.model.encode_text(tokens)[0].float(), dim=0)
    stages["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    square = saliency.gscorecam(clip, tensor, text, top_k=config.top_k, batch_size=1)
    saliency_map = np.clip(letterbox.map_to_original(square), 0.0, 1.0).astype(np.float32)
    saliency.clip_score(clip, tensor, text)
    stages["saliency"] = time.perf_counter() - start

    start = time.perf_counter()
    coarse = crf_refine(rgb, saliency_map, **config.crf_kwargs())
    stages["crf"] = time.perf_counter() - start

    start = time.perf_counter()
    boxes = boxes_from_mask(coarse, min_area=config.min_box_area, max_boxes=config.max_boxes, margin=config.box_margin)
    stages["boxes"] = time.perf_counter() - start

    timed_boxes = min(len(boxes), measured_boxes)
    predictor = SamPredictor(sam_model)
    start = time.perf_counter()
    for box in boxes[:timed_boxes]:
        predictor.set_image(rgb)
        predictor.predict(box=np.asarray(box, dtype=np.float64), multimask_output=False)
    per_box = (time.perf_counter() - start) / max(timed_boxes, 1)
    stages["sam"] = per_box * len(boxes)
    stages["total"] = sum(stages.values())
    return stages, len(boxes), timed_boxes


def gscorecam_sweep(variants, tensor: torch.Tensor, prompt: str, top_k: int):
    """Time gScoreCAM per variant and batch size.

    Args:
        variants: ``(name, clip, compute_dtype, batch sizes)`` tuples.

    Returns:
        Rows ``(name, batch, seconds, map)``.
    """
    rows = []
    for name, clip, compute_dtype, batches in variants:
        text = saliency.encode_prompt(clip, prompt)
        extra = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
        # Untimed warm-up: the first forward at a new batch shape also creates oneDNN kernels and touches fresh memory.
        saliency.clip_score(clip, tensor, text, **extra)
        for batch in batches:
            result, seconds = timed(saliency.gscorecam, clip, tensor, text, top_k=top_k, batch_size=batch, **extra)
            rows.append((name, batch, seconds, result))
            print(f"  gScoreCAM {name} batch {batch}: {seconds:.2f} s", flush=True)
    return rows


def sam_embedding_comparison(sam_model, rgb: np.ndarray) -> list[dict]:
    """Time SAM's image embedding with segment-anything's encoder forward and with the piecewise attention.

    Returns:
        Rows with the compute type, the implementation, seconds, and the largest absolute difference and the
        cosine similarity of the embedding against segment-anything's float32 embedding.
    """
    rows = []
    reference = None
    for dtype in (torch.float32, torch.bfloat16):
        for piecewise in (False, True):
            segmenter = SamBoxSegmenter(sam_model, encoder_dtype=dtype, piecewise_attention=piecewise)
            # Untimed warm-up on another size, so that the timed call does not include kernel creation.
            segmenter.set_image(np.ascontiguousarray(rgb[:-1]))
            _, seconds = timed(segmenter.set_image, rgb)
            features = segmenter.predictor.features.float()
            if reference is None:
                reference = features
            difference = float((features - reference).abs().max())
            cosine = float(torch.nn.functional.cosine_similarity(
                features.double().flatten(), reference.double().flatten(), dim=0))
            name = "float32" if dtype == torch.float32 else "bfloat16 autocast"
            implementation = "piecewise attention (library)" if piecewise else "segment-anything forward"
            rows.append({"dtype": name, "implementation": implementation, "seconds": seconds,
                         "max_difference": difference, "cosine": cosine})
            print(f"  SAM embedding {name}, {implementation}: {seconds:.2f} s", flush=True)
    return rows


def thread_comparison(clip, sam_model, tensor: torch.Tensor, rgb: np.ndarray, prompt: str, top_k: int,
                      batch: int, thread_counts: list[int]) -> list[dict]:
    """Time bfloat16 gScoreCAM (at `batch`) and SAM's bfloat16 image embedding with each torch thread count.

    The kernels for these shapes were created by earlier calls, so no warm-up runs here. The caller's thread count
    is restored afterwards.

    Returns:
        Rows with the thread count and the seconds of each stage.
    """
    previous = torch.get_num_threads()
    text = saliency.encode_prompt(clip, prompt)
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            _, gscorecam_seconds = timed(saliency.gscorecam, clip, tensor, text, top_k=top_k, batch_size=batch,
                                         compute_dtype=torch.bfloat16)
            # A new segmenter each time, because one that contains this image's embedding returns without computing it.
            sam = SamBoxSegmenter(sam_model, encoder_dtype=torch.bfloat16)
            _, sam_seconds = timed(sam.set_image, rgb)
            rows.append({"threads": threads, "gscorecam": gscorecam_seconds, "sam": sam_seconds})
            print(f"  {threads} threads: gScoreCAM {gscorecam_seconds:.2f} s, SAM embedding {sam_seconds:.2f} s",
                  flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Volume


def load_benchmark_volume(path: Path, slices: int) -> np.ndarray:
    """Read a volume and resample it linearly along axis 0 (the slice axis) to `slices` slices."""
    import SimpleITK as sitk
    from scipy import ndimage

    array = sitk.GetArrayFromImage(read_volume(path)).astype(np.float32)
    factor = slices / array.shape[0]
    resampled = ndimage.zoom(array, (factor, 1.0, 1.0), order=1)
    if resampled.shape[0] != slices:
        raise RuntimeError(f"Resampling {path} failed: got {resampled.shape[0]} slices, expected {slices}.")
    return resampled


def volume_benchmark(clip, sam_model, volume: np.ndarray, prompt: str, config: ZeroShotConfig, args) -> dict:
    """Time a volume with the presence rule and estimate (or time) the run over every slice.

    The presence threshold is calibrated on this model: the CLIP score of every slice is computed first (untimed
    set-up), and the threshold is the `args.target_slices`-th highest score, so that exactly those slices pass.
    """
    window = imaging.compute_window(volume[np.isfinite(volume)])
    scores = []
    for index in range(volume.shape[0]):
        rgb = imaging.to_rgb_uint8(extract_slice(volume, 0, index), window=window)
        tensor, _ = imaging.clip_input(rgb, clip.mean, clip.std, size=clip.image_size)
        text = saliency.encode_prompt(clip, prompt)
        scores.append(saliency.clip_score(clip, tensor, text, compute_dtype=_TORCH_DTYPES[config.precision]))
    order = np.argsort(scores)[::-1]
    threshold = float(scores[order[args.target_slices - 1]])
    targets = sorted(int(index) for index in np.nonzero(np.asarray(scores) >= threshold)[0])
    non_targets = [index for index in range(volume.shape[0]) if index not in targets]

    def run(segment_config, array):
        stamps = [time.perf_counter()]
        segmenter = ZeroShotSegmenter(clip, sam_model, segment_config)
        result = segmenter.segment_volume(array, prompt, window=window, progress=lambda *_: stamps.append(
            time.perf_counter()))
        return result, np.diff(stamps)

    print(f"  presence rule: threshold {threshold:.4f}, {len(targets)} slices pass: {targets}", flush=True)
    with_rule_config = ZeroShotConfig(**{**config.to_dict(), "presence_threshold": threshold, "window": None})
    (with_rule, per_slice), with_rule_seconds = timed(run, with_rule_config, volume)
    print(f"  volume with presence rule: {with_rule_seconds:.1f} s", flush=True)
    target_seconds = float(sum(per_slice[index] for index in with_rule.processed_slices if index not in
                               with_rule.skipped_slices))
    skipped_seconds = float(sum(per_slice[index] for index in with_rule.skipped_slices))

    every_config = ZeroShotConfig(**{**config.to_dict(), "presence_threshold": None, "window": None})
    if args.every_slice:
        (every, _), every_seconds = timed(run, every_config, volume)
        every_kind = "measured"
        sample = non_targets
    else:
        step = max(1, len(non_targets) // max(args.non_target_samples, 1))
        sample = non_targets[::step][: args.non_target_samples]
        (every, sample_per_slice), _ = timed(run, every_config, volume[sample])
        every_seconds = target_seconds + float(np.mean(sample_per_slice)) * len(non_targets)
        every_kind = f"estimated: {len(targets)} target slices measured + {len(non_targets)} x mean of {len(sample)} " \
                     "non-target slices run in full"
    print(f"  volume, every slice ({every_kind}): {every_seconds:.1f} s", flush=True)
    return {
        "slices": volume.shape[0],
        "shape": volume.shape,
        "threshold": threshold,
        "score_range": (float(min(scores)), float(max(scores))),
        "targets": targets,
        "with_rule_seconds": with_rule_seconds,
        "with_rule": with_rule,
        "target_seconds": target_seconds,
        "skipped_seconds": skipped_seconds,
        "every_seconds": every_seconds,
        "every_kind": every_kind,
        "sample": sample,
    }


# --------------------------------------------------------------------------------------------------------------------
# Report


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def seconds_text(value: float) -> str:
    return f"{value:.2f}"


def build_report(info: dict, results: dict) -> str:
    sections = [f"## {info['date']}{' (quick)' if info['quick'] else ''}", ""]
    sections.append(
        f"Machine: {info['cpu']}, {info['cores']} cores visible, bfloat16 instructions "
        f"({info['bf16_flags']}), torch {info['torch']}, {info['threads']} threads. "
        f"Load average (1/5/15 min) before: {info['load_before']}, after: {info['load_after']}."
    )
    sections.append(f"Command: `{info['command']}`")
    sections.append(
        f"Models: BiomedCLIP architecture (ViT-B/16 + BERT-base) and SAM ViT-B, random weights. "
        f"2D image: {info['image']} ({info['image_shape'][1]} x {info['image_shape'][0]} pixels), prompt "
        f"\"{PROMPT_2D}\", top_k {info['top_k']}."
    )
    sections.append("")

    rates = results["rates"]
    sections.append("Matrix-product rate (torch.mm, 2048 x 2048, best of 5):")
    sections.append("")
    sections.append(markdown_table(
        ["dtype", "GFLOP/s"],
        [["float32", f"{rates['float32'] / 1e9:.1f}"], ["bfloat16", f"{rates['bfloat16'] / 1e9:.1f}"]],
    ))
    sections.append("")

    sections.append(
        f"gScoreCAM, {info['top_k']} masked forwards plus one forward and backward pass (float32 batch 1 is the "
        "plain run's saliency stage, which also contains the whole-image CLIP score):"
    )
    sections.append("")
    sweep_rows = [[name, str(batch), seconds_text(seconds)] for name, batch, seconds, _ in results["sweep"]]
    sections.append(markdown_table(["compute type", "batch", "seconds"], sweep_rows))
    sections.append("")
    sections.append(
        "Pearson r of the gScoreCAM map against float32: "
        + ", ".join(f"{name} {value:.4f}" for name, value in results["sweep_fidelity"].items())
        + "."
    )
    sections.append("")

    sam_rows = [
        [row["dtype"], row["implementation"], seconds_text(row["seconds"]), f"{row['max_difference']:.2g}",
         f"{row['cosine']:.6f}"]
        for row in results["sam_embedding"]
    ]
    sections.append(
        "SAM ViT-B image embedding of the 2D image (1024 x 1024 input): segment-anything's own encoder forward "
        "(the plain run's SAM stage) against the piecewise attention of `MedCLIPSAMLib.sam_encoder` that the "
        "library uses. Difference and cosine similarity against segment-anything's float32 embedding:"
    )
    sections.append("")
    sections.append(markdown_table(
        ["compute type", "implementation", "seconds", "largest difference", "cosine similarity"], sam_rows))
    sections.append("")

    thread_rows = results["threads"]
    single = thread_rows[0]
    sections.append(
        f"Threads: bfloat16 gScoreCAM at the default batch of {results['batch_default']} and SAM's bfloat16 image "
        "embedding (piecewise attention) with one torch thread and with the run's thread count:"
    )
    sections.append("")
    sections.append(markdown_table(
        ["threads", "gScoreCAM seconds", "SAM embedding seconds", "speed-up over one thread (sum)"],
        [[str(row["threads"]), seconds_text(row["gscorecam"]), seconds_text(row["sam"]),
          f"{(single['gscorecam'] + single['sam']) / (row['gscorecam'] + row['sam']):.2f}"] for row in thread_rows],
    ))
    sections.append("")

    plain, fp32, bf16 = results["plain"], results["fp32"], results["bf16"]
    text_once = results["text_once"]
    stage_rows = []
    for stage in ("prepare", "saliency", "crf", "boxes", "sam"):
        stage_rows.append([stage, seconds_text(plain[stage]), seconds_text(fp32.timings[stage]),
                           seconds_text(bf16.timings[stage])])
    stage_rows.append(["text encoding (once per prompt)", "in prepare", seconds_text(text_once),
                       seconds_text(text_once)])
    totals = {
        "plain": plain["total"],
        "fp32": fp32.timings["total"] + text_once,
        "bf16": bf16.timings["total"] + text_once,
    }
    stage_rows.append(["**total**", f"**{totals['plain']:.2f}**", f"**{totals['fp32']:.2f}**",
                       f"**{totals['bf16']:.2f}**"])
    stage_rows.append(["speed-up over plain", "1.0", f"{totals['plain'] / totals['fp32']:.1f}",
                       f"{totals['plain'] / totals['bf16']:.1f}"])
    stage_rows.append(["boxes", str(results["plain_boxes"]), str(len(fp32.boxes)), str(len(bf16.boxes))])
    sections.append(
        f"2D pipeline, seconds per stage. Plain: float32, batch 1, prompt encoded per call, SAM embedding per box "
        f"(SAM stage timed on the first {results['plain_timed_boxes']} of {results['plain_boxes']} boxes and scaled "
        f"linearly to all of them). Library: the default batch of {results['batch_default']} in float32 and in "
        "bfloat16 autocast (`ZeroShotConfig(precision=\"bfloat16\")`), one SAM embedding per image with the "
        "piecewise attention, the prompt embedding computed once (its one-time cost is added to the totals)."
    )
    sections.append("")
    sections.append(markdown_table(["stage", "plain float32", "library float32", "library bfloat16"], stage_rows))
    sections.append("")

    flops = results["flops"]
    floor_bf16 = flops / rates["bfloat16"]
    floor_fp32 = flops / rates["float32"]
    sections.append(
        f"Compute floor: {flops / 1e12:.2f} TFLOP, counted with FlopCounterMode (matrix products, convolutions and "
        f"attention) in an untimed float32 pipeline call ({results['flops_pipeline'] / 1e12:.2f} TFLOP) plus the "
        f"prompt encoding. At the measured torch.mm rates this is "
        f"{floor_bf16:.2f} s in bfloat16 and {floor_fp32:.2f} s in float32. Library bfloat16 total / bfloat16 floor: "
        f"**{totals['bf16'] / floor_bf16:.2f}x**; library float32 total / float32 floor: "
        f"{totals['fp32'] / floor_fp32:.2f}x."
    )
    sections.append("")
    sweep_seconds = {(name, batch): seconds for name, batch, seconds, _ in results["sweep"]}
    gscorecam_seconds = sweep_seconds[("bfloat16 autocast", results["batch_default"])]
    sam_seconds = next(row["seconds"] for row in results["sam_embedding"]
                       if row["dtype"] == "bfloat16 autocast" and row["implementation"].startswith("piecewise"))
    stage_rates = []
    for stage, stage_flops, seconds in (
        ("gScoreCAM", results["flops_gscorecam"], gscorecam_seconds),
        ("SAM image embedding", results["flops_sam_embedding"], sam_seconds),
    ):
        rate = stage_flops / seconds
        stage_rates.append(
            f"{stage} {stage_flops / 1e12:.2f} TFLOP in {seconds:.2f} s = {rate / 1e9:.0f} GFLOP/s, "
            f"{100 * rate / rates['bfloat16']:.0f} % of the bfloat16 torch.mm rate"
        )
    sections.append(
        "Rate of the two large stages in bfloat16, with FLOPs counted separately and seconds from the gScoreCAM "
        "sweep at the default batch and from the SAM embedding table. " + "; ".join(stage_rates) + "."
    )
    sections.append("")

    fidelity_rows = []
    for name, values in results["fidelity"].items():
        fidelity_rows.append([
            name, f"{values['saliency_r']:.4f}", f"{values['coarse_dice']:.4f}",
            "no boxes" if np.isnan(values["sam_same_boxes_dice"]) else f"{values['sam_same_boxes_dice']:.4f}",
            f"{values['mask_dice']:.4f}",
            f"{values['boxes_fp32']} / {values['boxes_bf16']}", f"{values['mask_fraction_fp32']:.3f}",
        ])
    sections.append(
        "Fidelity, bfloat16 autocast pipeline against float32 (random weights) on the sample images of "
        "Resources/SampleData, and on one more X-ray where the shared data set is present. SAM with the same boxes: "
        "the float32 run's boxes decoded from the float32 and from the bfloat16 image embedding. Two empty masks "
        "count as Dice 1 and two equal constant saliency maps as r = 1."
    )
    sections.append("")
    sections.append(markdown_table(
        ["image, prompt", "saliency Pearson r", "coarse mask Dice", "SAM Dice, same boxes", "final mask Dice",
         "boxes float32 / bfloat16", "float32 mask fraction"],
        fidelity_rows,
    ))
    sections.append("")

    control_rows = [
        [name, f"{values['control_max_difference']:.2g}", f"{values['control_coarse_dice']:.4f}",
         f"{values['control_boxes']} / {values['boxes_fp32']}"]
        for name, values in results["fidelity"].items()
    ]
    sections.append(
        "Control: gScoreCAM in float32 again with one masked forward per batch instead of the default batch, which "
        "changes only the order of the rounding, and the CRF and boxes on that map, against the float32 run above."
    )
    sections.append("")
    sections.append(markdown_table(
        ["image, prompt", "largest saliency difference", "coarse mask Dice", "boxes batch 1 / default batch"],
        control_rows,
    ))
    sections.append("")

    volume = results.get("volume")
    if volume is not None:
        rule = volume["with_rule"]
        sections.append(
            f"Volume: {VOLUME_RELATIVE.as_posix()} ({volume['shape'][1]} x {volume['shape'][2]}) resampled linearly "
            f"to {volume['slices']} slices, prompt \"{PROMPT_VOLUME}\", bfloat16 autocast, "
            f"batch {results['batch_default']}. The "
            f"presence threshold ({volume['threshold']:.4f}; scores {volume['score_range'][0]:.4f} to "
            f"{volume['score_range'][1]:.4f}) was calibrated on this random model so that its "
            f"{len(volume['targets'])} highest-scoring slices pass: {volume['targets']}. This measures the cost of "
            "the rule and of skipping, not whether the rule finds the target, which random weights cannot show."
        )
        sections.append("")
        sections.append(markdown_table(
            ["run", "seconds", "slices segmented", "slices skipped"],
            [
                ["presence rule", seconds_text(volume["with_rule_seconds"]),
                 str(len(rule.found_slices) + len(rule.not_found_slices)), str(len(rule.skipped_slices))],
                [f"every slice ({volume['every_kind']})", seconds_text(volume["every_seconds"]),
                 str(volume["slices"]), "0"],
                ["speed-up", f"{volume['every_seconds'] / volume['with_rule_seconds']:.1f}", "", ""],
            ],
        ))
        sections.append("")
        sections.append(
            f"Of the presence-rule run, {volume['target_seconds']:.1f} s went to the {len(volume['targets'])} "
            f"segmented slices and {volume['skipped_seconds']:.1f} s to scoring the skipped ones."
        )
        sections.append("")
    return "\n".join(sections) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small settings (top_k 8, 8-slice volume) to test the "
                        "script in a few minutes; numbers are not comparable with a full run.")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medclipsam-bench",
                        help="Folder for the random-weight model files (default: %(default)s).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core this process may run on).")
    parser.add_argument("--output", type=Path, default=REPOSITORY_ROOT / "docs" / "benchmarks.md",
                        help="Markdown file the report is appended to (default: %(default)s).")
    parser.add_argument("--no-append", action="store_true", help="Print the report without appending it.")
    parser.add_argument("--no-volume", action="store_true", help="Skip the volume benchmark.")
    parser.add_argument("--every-slice", action="store_true",
                        help="Time the every-slice volume run in full instead of estimating it from a sample.")
    args = parser.parse_args(argv)
    args.top_k = 8 if args.quick else 60
    args.slices = 8 if args.quick else 40
    args.target_slices = 2 if args.quick else 10
    args.non_target_samples = 1 if args.quick else 3
    args.plain_boxes = 1 if args.quick else 2
    args.batches = [1, 8] if args.quick else [1, 8, 16]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    flags = cpu_flags()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "bf16_flags": ", ".join(sorted(flags & set(CPU_BFLOAT16_FLAGS))) or "none found",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": load_average(),
        "command": "python bench/bench_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "top_k": args.top_k,
    }
    print(f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads, load {info['load_before']}", flush=True)

    results: dict = {}
    results["rates"] = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    print("  torch.mm GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in results["rates"].items()), flush=True)

    clip_folder = build_random_biomedclip(args.cache / "biomedclip_vit_b16_random_scale100")
    sam_path = build_random_sam_checkpoint(args.cache / "sam_vit_b_random.pth")
    clip = load_clip(f"local-dir:{clip_folder}", device="cpu", dtype=torch.float32)
    clip_bf16_weights = load_clip(f"local-dir:{clip_folder}", device="cpu", dtype=torch.bfloat16)
    sam_model = load_sam("vit_b", checkpoint=sam_path, device="cpu")

    data = data_folder()
    image = read_image(data / IMAGE_RELATIVE)
    info["image"] = IMAGE_RELATIVE.as_posix()
    info["image_shape"] = image.shape

    # One-time prompt encoding (the text tower always runs in float32). Its FLOPs are counted on the volume
    # prompt, which costs the same because the text tower always runs over the full 256-token context, so that
    # the timed call runs without the counter.
    _, text_flops = count_flops(saliency.encode_prompt, clip, PROMPT_VOLUME)
    _, results["text_once"] = timed(saliency.encode_prompt, clip, PROMPT_2D)
    print(f"  prompt encoding: {results['text_once']:.2f} s", flush=True)

    rgb = imaging.to_rgb_uint8(image)
    tensor, _ = imaging.clip_input(rgb, clip.mean, clip.std, size=clip.image_size)
    batches = [batch for batch in args.batches if batch != 1]
    variants = [
        ("float32", clip, None, batches),
        ("bfloat16 autocast", clip, torch.bfloat16, args.batches),
        ("bfloat16 weights", clip_bf16_weights, None, batches[:1]),
    ]
    results["sweep"] = gscorecam_sweep(variants, tensor, PROMPT_2D, args.top_k)
    default_batch = ZeroShotConfig().batch_size
    sweep_maps = {(name, batch): square for name, batch, _, square in results["sweep"]}
    reference = sweep_maps[("float32", default_batch)]
    results["sweep_fidelity"] = {
        "bfloat16 autocast": pearson(reference, sweep_maps[("bfloat16 autocast", default_batch)]),
        "bfloat16 weights": pearson(reference, sweep_maps[("bfloat16 weights", batches[0])]),
    }

    # The library runs use the default batch size, which is what users get; the sweep above shows the others.
    results["batch_default"] = default_batch
    config_fp32 = ZeroShotConfig(top_k=args.top_k, precision="float32")
    config_bf16 = ZeroShotConfig(top_k=args.top_k, precision="bfloat16")

    # Untimed float32 run that counts the pipeline's FLOPs (the count does not depend on the type) and warms SAM.
    # FlopCounterMode cannot run SAM under autocast: it decomposes SAM's einsum after autocast has cast its inputs,
    # which fails on mixed types.
    _, results["flops_pipeline"] = count_flops(ZeroShotSegmenter(clip, sam_model, config_fp32).segment, image,
                                               PROMPT_2D)
    results["flops"] = results["flops_pipeline"] + text_flops
    text = saliency.encode_prompt(clip, PROMPT_2D)
    _, results["flops_gscorecam"] = count_flops(
        saliency.gscorecam, clip, tensor, text, top_k=args.top_k, batch_size=results["batch_default"]
    )
    _, results["flops_sam_embedding"] = count_flops(SamBoxSegmenter(sam_model).set_image, rgb)
    # Untimed warm-up of SAM's autocast path on another image size.
    SamBoxSegmenter(sam_model, encoder_dtype=torch.bfloat16).set_image(np.ascontiguousarray(rgb[:-1]))
    results["sam_embedding"] = sam_embedding_comparison(sam_model, rgb)
    # One thread against every thread the run uses (--threads, by default every core it may run on).
    thread_counts = sorted({1, torch.get_num_threads()})
    results["threads"] = thread_comparison(clip, sam_model, tensor, rgb, PROMPT_2D, args.top_k,
                                           results["batch_default"], thread_counts)

    segmenter_bf16 = ZeroShotSegmenter(clip, sam_model, config_bf16)
    results["bf16"] = segmenter_bf16.segment(image, PROMPT_2D)
    print(f"  library bfloat16: {results['bf16'].timings}", flush=True)
    segmenter_fp32 = ZeroShotSegmenter(clip, sam_model, config_fp32)
    results["fp32"] = segmenter_fp32.segment(image, PROMPT_2D)
    print(f"  library float32: {results['fp32'].timings}", flush=True)
    plain, box_count, timed_boxes = plain_pipeline(clip, sam_model, image, PROMPT_2D, config_fp32, args.plain_boxes)
    results["plain"], results["plain_boxes"], results["plain_timed_boxes"] = plain, box_count, timed_boxes
    results["sweep"].insert(0, ("float32", 1, plain["saliency"], None))
    print(f"  plain float32: {plain}", flush=True)

    results["fidelity"] = {}

    def add_fidelity(name, fp32_result, bf16_result, fp32_sam, bf16_sam):
        # SAM alone: the same (float32) boxes decoded from the float32 and the bfloat16 image embedding. A run
        # whose coarse mask was empty never embedded the image, so it is embedded here.
        same_boxes = fp32_result.boxes
        sam_dice = float("nan")
        if len(same_boxes):
            for sam_segmenter, result in ((fp32_sam, fp32_result), (bf16_sam, bf16_result)):
                if sam_segmenter.image_hw is None:
                    sam_segmenter.set_image(result.rgb)
            sam_dice = dice(bf16_sam.segment_boxes(same_boxes), fp32_sam.segment_boxes(same_boxes))
        # Control: float32 again with one masked forward per batch, which changes only the rounding.
        control_tensor, letterbox = imaging.clip_input(fp32_result.rgb, clip.mean, clip.std, size=clip.image_size)
        control_square = saliency.gscorecam(
            clip, control_tensor, saliency.encode_prompt(clip, fp32_result.prompt), top_k=args.top_k, batch_size=1
        )
        control_map = np.clip(letterbox.map_to_original(control_square), 0.0, 1.0).astype(np.float32)
        control_coarse = crf_refine(fp32_result.rgb, control_map, **config_fp32.crf_kwargs())
        control_boxes = boxes_from_mask(
            control_coarse, min_area=config_fp32.min_box_area, max_boxes=config_fp32.max_boxes,
            margin=config_fp32.box_margin,
        )
        results["fidelity"][name] = {
            "control_max_difference": float(np.max(np.abs(control_map - fp32_result.saliency))),
            "control_coarse_dice": dice(control_coarse, fp32_result.coarse_mask),
            "control_boxes": len(control_boxes),
            "saliency_r": pearson(fp32_result.saliency, bf16_result.saliency),
            "coarse_dice": dice(bf16_result.coarse_mask, fp32_result.coarse_mask),
            "sam_same_boxes_dice": sam_dice,
            "mask_dice": dice(bf16_result.mask, fp32_result.mask),
            "boxes_fp32": len(fp32_result.boxes),
            "boxes_bf16": len(bf16_result.boxes),
            "mask_fraction_fp32": float(np.mean(fp32_result.mask)),
        }

    # The 2D image above is the first sample image (the same BUSI file), so its runs are reused.
    first_sample, first_prompt = SAMPLE_IMAGES[0]
    add_fidelity(
        f"{first_sample}, \"{first_prompt}\"", results["fp32"], results["bf16"], segmenter_fp32.sam, segmenter_bf16.sam
    )
    fidelity_images = [] if args.quick else [
        (name, SAMPLE_FOLDER / name, prompt) for name, prompt in SAMPLE_IMAGES[1:]
    ]
    extra_path = data / EXTRA_FIDELITY_IMAGE[0]
    if not args.quick and extra_path.is_file():
        fidelity_images.append((EXTRA_FIDELITY_IMAGE[0].as_posix() + " (extra)", extra_path, EXTRA_FIDELITY_IMAGE[1]))
    for name, path, prompt in fidelity_images:
        second = read_image(path)
        second_fp32 = ZeroShotSegmenter(clip, sam_model, config_fp32)
        second_bf16 = ZeroShotSegmenter(clip, sam_model, config_bf16)
        add_fidelity(
            f"{name}, \"{prompt}\"",
            second_fp32.segment(second, prompt),
            second_bf16.segment(second, prompt),
            second_fp32.sam,
            second_bf16.sam,
        )
    print(f"  fidelity: {results['fidelity']}", flush=True)

    if not args.no_volume:
        volume = load_benchmark_volume(data / VOLUME_RELATIVE, args.slices)
        results["volume"] = volume_benchmark(clip, sam_model, volume, PROMPT_VOLUME, config_bf16, args)

    info["load_after"] = load_average()
    report = build_report(info, results)
    print()
    print(report)
    if not args.no_append:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write("\n" + report)
        print(f"Appended to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
