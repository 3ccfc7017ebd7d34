"""Shuffled-batch throughput of the data layer from a page-cached memmap.

Writes a release of `--frames` frames with the generator (once; reused if present),
builds the protein-channel cache, pulls the cache into the page cache from another
process, then times shuffled batches of `--batch-size` through
`Dataset.get_batches` and prints JSON: images/s and this process's memory.

    python benchmarks/bench_data_pipeline.py --frames 200000 --workdir /tmp/dlfb_bench

Memory is measured while iterating only (the peak is reset after the cache is
built). `peak_rss_gib` (VmHWM) counts the memmap's file-backed pages the process
touched, which the kernel can drop at any time; `anon_gib` is memory the process
itself allocated (RssAnon), the part that can run a machine out of RAM.
"""

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

from dlfb_localization.dataset.synthetic import SyntheticSpec, write_release
from dlfb_localization.dataset.utils import get_dataset


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=400, help="timed batches")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dlfb_bench"))
    args = parser.parse_args()

    spec = SyntheticSpec(
        n_proteins=math.ceil(args.frames / 200),
        fovs_per_protein=10,
        crops_per_fov=20,
        n_blocks=10,
        seed=0,
    )
    data = args.workdir / f"release_{spec.n_proteins}p"
    if not (data / "Label_data00.csv").exists():
        start = time.perf_counter()
        write_release(data, spec, progress=True)
        print(f"wrote the release in {time.perf_counter() - start:.0f} s")
    dataset = get_dataset(data, progress=True)
    cache = next((data / "dlfb_cache").glob("images_c0.npy"))
    subprocess.run(["cat", str(cache)], stdout=subprocess.DEVNULL, check=True)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    batches = dataset.get_batches(rng=0, batch_size=args.batch_size)
    next(batches)  # first batch outside the timing
    n_images = 0
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        n_images += len(batch["images"])
        if i + 1 >= args.batches:
            break
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "frames": len(dataset),
                "cache_gib": round(cache.stat().st_size / 2**30, 2),
                "batch_size": args.batch_size,
                "timed_batches": n_images // args.batch_size,
                "images_per_s": round(n_images / seconds),
                "peak_rss_gib": round(_status_kib("VmHWM") / 2**20, 2),
                "anon_gib": round(_status_kib("RssAnon") / 2**20, 3),
                "file_backed_gib": round(_status_kib("RssFile") / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
