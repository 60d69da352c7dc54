"""Pipeline benchmark on a synthetic 512x512xN chest CT (same as ``ssalesionseg bench``).

Prints seconds per stage (read, lungs, lesions, stats, write), lesion slices/s, peak RSS,
and SSA-Net forward time with and without the spatial convolution. Example:

    python Testing/benchmarks/bench_pipeline.py --slices 8
    python Testing/benchmarks/bench_pipeline.py --slices 300 --device cuda --json bench.json
"""
import sys

from ssalesionseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
