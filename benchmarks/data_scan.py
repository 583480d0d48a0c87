"""Data pipeline speed: metadata scan vs full decode, latent caching vs a bare encode loop, batch fetch
vs a training step, each measured as a ratio of two sides timed in the same run.

Why: start-up must not decode every image just to bucket it, the latent cache must not cost much
more than encoding the images by hand, and once cached, assembling a batch must be negligible next to
the training step. Absolute rates depend on the machine; the ratios are what the targets apply to.

1. A synthetic dataset of ``--images`` pictures (default 10,000) of random size, each side drawn
   from 512-2048 px (so aspects range from 1:4 to 4:1), mostly JPEG at quality 85 with a share of
   PNGs and of JPEGs carrying an EXIF orientation tag, each with a caption ``.txt``, in shards of
   1,000. Pixels are cheap gradients with a few rectangles, so generating is fast. Such smooth images
   decode faster than photos, so the decode baseline below is flattered and the scan/decode ratio is
   a lower bound. ``--data DIR`` keeps the folder for later runs; generation is skipped for images
   already there.
2. ``scan_image_dataset`` over the whole folder (header reads only) against a full PIL decode
   (``Image.open(p).convert("RGB")``) of a random sample of ``--decode-sample`` files (decoding 10k
   large images takes too long on a small machine): ratio of images/s, target >= 20. Every file is
   read once beforehand so both sides measure CPU work from the OS page cache, not the disk, and
   ``--scan-rounds`` full scans alternate with the decode of a part of the sample each. The
   scan's peak memory is reported twice: Python allocations (tracemalloc peak, a second pass since
   tracing slows the scan) and the growth of the process's peak RSS (``ru_maxrss``) across the first
   scan, which runs before torch is imported; target under 1 GiB.
3. ``VaeCache.ensure`` (content hashing, decode, resize, encode, safetensors writes) on
   ``--vae-images`` images bucketed at 256 px (``resolution_type pixel``) with the tiny sd1x VAE,
   into a fresh cache folder, against a bare loop over the same buckets and batches doing
   ``load_image_tensor`` + ``vae.encode(batch).latent_dist`` with no caching: ratio of images/s,
   target >= 0.9. Every batch shape is encoded once beforehand (a convolution's first call at a
   new shape is slow); within a round the two sides alternate bucket by bucket (``ensure`` gets
   one bucket per call), and the median of the per-round ratios is reported, so a burst of
   background load does not decide the result.
4. ``TrainingData.next_batch`` (from ``build_training_data``: 64 images of 64 px, batch 4, tensors
   in RAM) against the bare training step of ``benchmarks/step_overhead.py`` (tiny UNet, rank-4
   LoRA, forward/backward/clip/AdamW), interleaved call by call: fetch median as a percentage of the
   step median, target < 5 %.
5. ``--dataloader_prefetch``: how long the consumer is blocked in ``next_batch`` per step when a
   batch costs real work (``--vae_cache_disable``: every batch is decoded and VAE-encoded when drawn,
   the 64-image 64 px dataset, batch 4, tiny sd1x VAE), with and without prefetch. The step is
   simulated by sleeping for the median bare training step measured in 4, so the loader thread has
   the CPU to itself as it would while a GPU computes the step. After the first ``--prefetch-warmup``
   steps (the queue filling), the mean wait per step with prefetch must stay under 1 % of the step
   (the consumer never waits on data); without prefetch it is the whole load time.

    python benchmarks/data_scan.py [--images 10000] [--data DIR] [--decode-sample 300] [--vae-images 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARD_SIZE = 1000
CAPTION_WORDS = ("red", "blue", "green", "soft", "bright", "gradient", "square", "wide", "tall", "photo",
                 "of", "a", "with", "light", "dark", "background", "scene", "pattern")
GIB = 1 << 30


# --- 1. synthetic dataset ------------------------------------------------------------------------


def _image_plan(index: int, seed: int, min_side: int, max_side: int, png_share: float, exif_share: float):
    """(relative stem, width, height, format, exif orientation or None) of image ``index``; deterministic."""
    rng = random.Random(seed * 1_000_003 + index)
    width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    fmt = "png" if rng.random() < png_share else "jpg"
    orientation = rng.choice((3, 6, 8)) if fmt == "jpg" and rng.random() < exif_share else None
    stem = f"shard_{index // SHARD_SIZE:02d}/img_{index:06d}"
    return stem, width, height, fmt, orientation


def _write_image(job) -> int:
    """Write one image and its caption (worker process); returns bytes written. Skips finished pairs."""
    from PIL import Image, ImageDraw

    root, index, seed, min_side, max_side, png_share, exif_share = job
    stem, width, height, fmt, orientation = _image_plan(index, seed, min_side, max_side, png_share, exif_share)
    image_path = Path(root) / f"{stem}.{fmt}"
    caption_path = Path(root) / f"{stem}.txt"
    if image_path.exists() and caption_path.exists():
        return 0
    image_path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 7_919 + index)
    # A 2x2 colour grid stretched bilinearly: a smooth gradient for the price of one resize.
    corners = Image.frombytes("RGB", (2, 2), bytes(rng.randrange(256) for _ in range(12)))
    image = corners.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = min(width, x0 + rng.randint(16, width // 2)), min(height, y0 + rng.randint(16, height // 2))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    temp = image_path.with_name(f".{image_path.name}.tmp")
    if fmt == "png":
        image.save(temp, "PNG", compress_level=1)
    else:
        extra = {}
        if orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = orientation
            extra["exif"] = exif
        image.save(temp, "JPEG", quality=85, **extra)
    os.replace(temp, image_path)
    caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(4, 12)))
    caption_path.write_text(caption + "\n", encoding="utf-8")
    return image_path.stat().st_size


def generate_dataset(root: Path, count: int, args) -> tuple[int, float]:
    """Create the missing images of ``root`` in worker processes; returns (images written, seconds).

    Workers keep the big pixel buffers out of this process, so its peak RSS before the scan is
    only the interpreter and imports.
    """
    started = time.perf_counter()
    jobs = [(str(root), i, args.seed, args.min_side, args.max_side, args.png_share, args.exif_share)
            for i in range(count)]
    written = 0
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for size in pool.imap_unordered(_write_image, jobs, chunksize=16):
            written += size > 0
    return written, time.perf_counter() - started


def warm_page_cache(root: Path) -> int:
    """Read every file once so scan and decode both run from the OS page cache; returns bytes read."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    total += len(chunk)
    return total


# --- 2. metadata scan vs full decode -------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_scan_and_decode(cfg, args):
    """Alternate full scans with full decodes of parts of a random sample.

    Returns (scan result, scan seconds per round, decode seconds per round, the decoded sample,
    peak-RSS growth across the first scan, tracemalloc peak of an extra traced scan). Alternating
    spreads background load over both sides; the traced scan comes last since tracing slows it.
    """
    from PIL import Image

    from simpletuner.data.metadata import scan_image_dataset

    def scan() -> tuple[object, float]:
        started = time.perf_counter()
        result = scan_image_dataset(cfg)
        return result, time.perf_counter() - started

    def decode(paths: list[Path]) -> float:
        started = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")
        return time.perf_counter() - started

    rss_before = peak_rss_bytes()
    result, seconds = scan()
    rss_growth = peak_rss_bytes() - rss_before
    sample = random.Random(args.seed).sample(result.records, min(args.decode_sample, len(result.records)))
    rounds = max(1, min(args.scan_rounds, len(sample)))
    scan_times, decode_times = [seconds], []
    for round_index in range(rounds):
        if round_index:
            scan_times.append(scan()[1])
        decode_times.append(decode([r.path for r in sample[round_index::rounds]]))
    tracemalloc.start()
    scan_image_dataset(cfg)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, scan_times, decode_times, sample, rss_growth, traced_peak


# --- 3. latent caching vs a bare encode loop -----------------------------------------------------


def load_tiny_sd1x(folder: Path):
    """The tiny sd1x pipeline written to ``folder`` and loaded as the trainer loads models (fp32, CPU)."""
    import torch

    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.options.resolve import merge_sources
    from simpletuner.testing.tiny_models import make_tiny_model

    make_tiny_model("sd1x", folder)
    config = merge_sources({}, {"model_family": "sd1x", "pretrained_model_name_or_path": str(folder)},
                           "benchmarks/data_scan.py", [])
    model = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


def measure_vae(records, model, args, work: Path) -> tuple[list[float], list[float], int]:
    """Per-round seconds of the cached side and of the bare side, and the number of buckets.

    Each round caches into a fresh folder, so every round hashes, decodes, encodes and writes all
    ``records``. Within a round the sides are interleaved bucket by bucket (``ensure`` is given one
    bucket at a time; it loops over buckets anyway, and the extra content-index writes count
    against the cache) and the side that goes first alternates, so background load hits both alike.
    """
    import torch

    from simpletuner.data.buckets import assign_buckets, bucket_alignment
    from simpletuner.data.cache.vae import VaeCache
    from simpletuner.data.images import load_image_tensor

    alignment = bucket_alignment(64, model.vae_scale_factor(), args.vae_resolution)
    buckets = assign_buckets(records, args.vae_resolution, "pixel", alignment, crop=False)
    batch_size = args.vae_batch_size

    def cached(cache: VaeCache, size, bucket) -> float:
        started = time.perf_counter()
        report = cache.ensure({size: bucket}, model, batch_size, progress=False)
        seconds = time.perf_counter() - started
        if report.built != len(bucket) or report.skipped:
            raise RuntimeError(f"latent cache built {report.built} of {len(bucket)}, skipped {report.skipped[:3]}")
        return seconds

    def bare(size, bucket) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(bucket), batch_size):
                pixels = torch.stack([load_image_tensor(r.path, size) for r in bucket[start:start + batch_size]])
                posterior = model.vae.encode(pixels).latent_dist
                posterior.mean.float(), posterior.std.float()
        return time.perf_counter() - started

    # Warm-up on every batch shape: the first convolution at a new shape is much slower (kernel
    # selection, allocations), and that cost would otherwise land on whichever side runs first.
    shapes = {(min(batch_size, len(bucket) - start), size)
              for size, bucket in buckets.items() for start in range(0, len(bucket), batch_size)}
    with torch.no_grad():
        for count, (width, height) in sorted(shapes):
            model.vae.encode(torch.zeros(count, 3, height, width))
    cached_times, bare_times = [], []
    turn = 0
    for round_index in range(args.vae_rounds):
        cache = VaeCache(work / f"vae_cache_{round_index}", "bench", args.data_root, crop=False)
        cached_seconds = bare_seconds = 0.0
        for size, bucket in buckets.items():
            if turn % 2 == 0:
                cached_seconds += cached(cache, size, bucket)
                bare_seconds += bare(size, bucket)
            else:
                bare_seconds += bare(size, bucket)
                cached_seconds += cached(cache, size, bucket)
            turn += 1
        cached_times.append(cached_seconds)
        bare_times.append(bare_seconds)
    return cached_times, bare_times, len(buckets)


# --- 4. cached batch fetch vs training step ------------------------------------------------------


def load_step_overhead():
    """``benchmarks/step_overhead.py`` as a module, for its trainer builder and bare training step."""
    path = Path(__file__).with_name("step_overhead.py")
    spec = importlib.util.spec_from_file_location("step_overhead_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_fetch(work: Path, args) -> tuple[list[float], list[float]]:
    """Per-call seconds of ``next_batch`` and of the bare step, interleaved so load hits both alike."""
    step_overhead = load_step_overhead()
    trainer = step_overhead.build_trainer(work, args.batch_size)
    bare_step = step_overhead.bare_loop_factory(trainer)
    data = trainer.data
    for _ in range(5):
        data.next_batch()
        bare_step()
    fetch_times, step_times = [], []
    for _ in range(args.fetch_calls):
        started = time.perf_counter()
        data.next_batch()
        fetched = time.perf_counter()
        bare_step()
        step_times.append(time.perf_counter() - fetched)
        fetch_times.append(fetched - started)
    return fetch_times, step_times


# --- 5. prefetch: time the consumer waits on data -------------------------------------------------


def measure_prefetch_wait(work: Path, model, step_seconds: float, args) -> dict[str, list[float]]:
    """Seconds blocked in ``next_batch`` at each of ``--prefetch-steps`` simulated steps, per mode
    (``sync``: no prefetch; ``prefetch``: ``--dataloader_prefetch`` with ``--prefetch-qlen``).

    The latent cache is disabled, so each batch is decoded and encoded when drawn: a load that costs
    real time. Each step sleeps ``step_seconds`` after its batch arrives. The modes alternate over
    ``--prefetch-rounds`` rounds so background load hits both alike.
    """
    from simpletuner.data.build import build_training_data
    from simpletuner.data.config import parse_dataset_plan
    from simpletuner.options.resolve import merge_sources
    from simpletuner.testing.shapes import make_demo_dataset

    make_demo_dataset(work / "data", 64, size=64)
    plan = parse_dataset_plan([
        {"id": "shapes", "type": "local", "instance_data_dir": str(work / "data")},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(work / "text")},
    ])
    base = {"model_family": "sd1x", "resolution": 64, "resolution_type": "pixel", "cache_dir": str(work / "cache"),
            "train_batch_size": args.batch_size, "seed": 0, "vae_cache_disable": True,
            "dataloader_prefetch_qlen": args.prefetch_qlen}
    waits: dict[str, list[float]] = {"sync": [], "prefetch": []}
    for round_index in range(args.prefetch_rounds):
        modes = ("sync", "prefetch") if round_index % 2 == 0 else ("prefetch", "sync")
        for mode in modes:
            config = merge_sources({}, {**base, "dataloader_prefetch": mode == "prefetch"},
                                   "benchmarks/data_scan.py", [])
            data = build_training_data(config, model, plan, show_progress=False, num_processes=1)
            try:
                for step in range(args.prefetch_steps):
                    started = time.perf_counter()
                    data.next_batch(step)
                    waited = time.perf_counter() - started
                    if step >= args.prefetch_warmup:
                        waits[mode].append(waited)
                    time.sleep(step_seconds)
            finally:
                data.close()
    return waits


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="dataset size to generate and scan")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the generated dataset here and reuse it (default: a temporary folder)")
    parser.add_argument("--min-side", type=int, default=512)
    parser.add_argument("--max-side", type=int, default=2048)
    parser.add_argument("--png-share", type=float, default=0.15, help="fraction of PNG images")
    parser.add_argument("--exif-share", type=float, default=0.1, help="fraction of JPEGs with an EXIF orientation")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes generating images (not timed)")
    parser.add_argument("--generate-only", action="store_true", help="write the dataset (use with --data) and stop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-sample", type=int, default=300, help="images fully decoded for the baseline")
    parser.add_argument("--scan-rounds", type=int, default=3,
                        help="full scans, each followed by a full decode of a part of the sample")
    parser.add_argument("--vae-images", type=int, default=128)
    parser.add_argument("--vae-resolution", type=int, default=256)
    parser.add_argument("--vae-batch-size", type=int, default=4)
    parser.add_argument("--vae-rounds", type=int, default=3,
                        help="rounds per side, each with a fresh cache; the median round ratio is reported")
    parser.add_argument("--fetch-calls", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4, help="training batch for the fetch/step comparison")
    parser.add_argument("--prefetch-steps", type=int, default=40, help="simulated steps per mode and round")
    parser.add_argument("--prefetch-rounds", type=int, default=2, help="rounds, alternating which mode goes first")
    parser.add_argument("--prefetch-warmup", type=int, default=2,
                        help="first steps of each run left out of the prefetch figures (the queue fills)")
    parser.add_argument("--prefetch-qlen", type=int, default=10, help="--dataloader_prefetch_qlen")
    args = parser.parse_args()
    if args.prefetch_steps <= args.prefetch_warmup:
        parser.error("--prefetch-steps must be larger than --prefetch-warmup")

    from simpletuner.data.config import ImageDatasetConfig

    with tempfile.TemporaryDirectory(prefix="data_scan_") as folder:
        work = Path(folder)
        args.data_root = (args.data or work / "images").resolve()
        args.data_root.mkdir(parents=True, exist_ok=True)

        print(f"dataset: {args.data_root}")
        written, gen_seconds = generate_dataset(args.data_root, args.images, args)
        print(f"generated {written} images in {gen_seconds:.1f} s ({args.images - written} already there; "
              f"sides {args.min_side}-{args.max_side} px, {args.workers} workers)")
        if args.generate_only:
            return 0
        warmed = warm_page_cache(args.data_root)
        print(f"page cache warmed: {warmed / 2**20:.0f} MiB read")

        # 2. Scan first, before torch is imported, so the peak-RSS baseline is just the interpreter.
        cfg = ImageDatasetConfig(id="bench", type="local", instance_data_dir=str(args.data_root))
        scan, scan_times, decode_times, sample, rss_growth, traced_peak = measure_scan_and_decode(cfg, args)
        found = len(scan.records)
        if not found:
            raise SystemExit(f"no usable images in {args.data_root}; skipped: {scan.skipped[:3]}")
        if scan.skipped:
            print(f"warning: scan skipped {len(scan.skipped)} files, first: {scan.skipped[0]}")
        if found != args.images:
            print(f"note: the folder holds {found} usable images, not {args.images}; all were scanned")
        scan_rate = found * len(scan_times) / sum(scan_times)
        decode_rate = len(sample) / sum(decode_times)
        print(f"scan: {found} images x {len(scan_times)} passes, "
              + ", ".join(f"{t:.2f}" for t in scan_times) + f" s = {scan_rate:.0f} img/s; "
              f"tracemalloc peak {traced_peak / 2**20:.1f} MiB, peak RSS growth {rss_growth / 2**20:.1f} MiB")
        mean_mp = statistics.fmean(r.width * r.height for r in scan.records) / 1e6
        sample_mp = statistics.fmean(r.width * r.height for r in sample) / 1e6
        print(f"full decode (random sample of {len(sample)} in {len(decode_times)} parts, alternating with the "
              f"scans): {sum(decode_times):.2f} s = {decode_rate:.1f} img/s; "
              f"mean size {sample_mp:.2f} MP in the sample, {mean_mp:.2f} MP over all")

        # 3. Latent caching.
        model = load_tiny_sd1x(work / "tiny_sd1x")
        vae_records = random.Random(args.seed + 1).sample(scan.records, min(args.vae_images, found))
        cached_times, bare_times, vae_buckets = measure_vae(vae_records, model, args, work)
        vae_count = len(vae_records)
        cached_rate = vae_count / statistics.median(cached_times)
        bare_rate = vae_count / statistics.median(bare_times)
        round_ratios = [bare / cached for cached, bare in zip(cached_times, bare_times)]
        vae_ratio = statistics.median(round_ratios)
        print(f"latents: {vae_count} images in {vae_buckets} buckets at {args.vae_resolution} px, batch "
              f"{args.vae_batch_size}, {args.vae_rounds} rounds: VaeCache.ensure {cached_rate:.1f} img/s, "
              f"bare decode+encode {bare_rate:.1f} img/s (median rounds); cached/bare rate per round: "
              + ", ".join(f"{ratio:.3f}" for ratio in round_ratios))

        # 4. Batch fetch vs step.
        import torch

        fetch_times, step_times = measure_fetch(work / "fetch", args)
        fetch_median, step_median = statistics.median(fetch_times), statistics.median(step_times)
        print(f"fetch: next_batch median {fetch_median * 1e3:.3f} ms, bare step median {step_median * 1e3:.2f} ms "
              f"over {args.fetch_calls} interleaved calls (batch {args.batch_size})")

        # 5. Waiting on data with and without prefetch, at the step time just measured.
        waits = measure_prefetch_wait(work / "prefetch", model, step_median, args)
        del model
        sync_wait, prefetch_wait = statistics.fmean(waits["sync"]), statistics.fmean(waits["prefetch"])
        prefetch_share = 100 * prefetch_wait / step_median
        wait_ratio = prefetch_wait / sync_wait if sync_wait else float("nan")
        print(f"prefetch: next_batch wait per simulated {step_median * 1e3:.2f} ms step (vae_cache_disable: each "
              f"batch decoded and encoded when drawn; {len(waits['sync'])} steady-state steps per mode): without "
              f"prefetch mean {sync_wait * 1e3:.2f} ms (median {statistics.median(waits['sync']) * 1e3:.2f}), with "
              f"prefetch mean {prefetch_wait * 1e3:.3f} ms (median {statistics.median(waits['prefetch']) * 1e3:.3f}, "
              f"max {max(waits['prefetch']) * 1e3:.3f}); with/without {wait_ratio:.4f}")

    scan_ratio = scan_rate / decode_rate
    fetch_share = 100 * fetch_median / step_median
    rows = [
        ("scan rate / full-decode rate (decode from a sample)", f"{scan_ratio:.1f}x", ">= 20x", scan_ratio >= 20),
        ("scan peak memory, tracemalloc", f"{traced_peak / 2**20:.1f} MiB", "< 1 GiB", traced_peak < GIB),
        ("scan peak memory, ru_maxrss growth", f"{rss_growth / 2**20:.1f} MiB", "< 1 GiB", rss_growth < GIB),
        ("VaeCache.ensure rate / bare encode rate (median round)", f"{vae_ratio:.3f}", ">= 0.9", vae_ratio >= 0.9),
        ("next_batch / training step (medians)", f"{fetch_share:.2f} %", "< 5 %", fetch_share < 5),
        ("prefetch: wait in next_batch / step (steady-state mean)", f"{prefetch_share:.2f} %", "< 1 %",
         prefetch_share < 1),
    ]
    print(f"\n=== data pipeline summary: {found} images ({args.min_side}-{args.max_side} px sides; "
          f"{written} generated in {gen_seconds:.0f} s), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs ===")
    print(f"scan {scan_rate:.0f} img/s | decode {decode_rate:.1f} img/s (sample of {len(sample)}) | "
          f"cached latents {cached_rate:.1f} img/s | bare latents {bare_rate:.1f} img/s | "
          f"fetch {fetch_median * 1e3:.3f} ms | step {step_median * 1e3:.2f} ms | "
          f"wait without prefetch {sync_wait * 1e3:.2f} ms, with {prefetch_wait * 1e3:.3f} ms per step")
    width = max(len(row[0]) for row in rows)
    for name, value, target, passed in rows:
        print(f"{name:<{width}}  {value:>11}  target {target:<7}  {'PASS' if passed else 'FAIL'}")
    return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
