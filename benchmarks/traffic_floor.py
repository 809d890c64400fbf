"""The memory floor of a small-batch step: how long a member-step's unavoidable traffic takes.

    python benchmarks/traffic_floor.py               # the default MLP, packs of 8
    python benchmarks/traffic_floor.py --pack 16 --processes 2

A heavy-ball step reads a member's weights at least once for the forward pass and reads and
writes its weights and momentum once for the update: 5 × 4 bytes per parameter (1.6 MB for
the default MLP, 40-256-256-10), whatever the batch size. This streams exactly that through
the caches, member after member as a pack's step does (a pack of 8 does not fit in L2, so
it comes from L3), in a small C loop compiled with the flags of sgdnoise's kernels, and
prints µs per member-step and GB/s, next to the time the step's FLOPs at B = 4 and 8 take at
a given peak. With --processes 2 two copies run at once, as a sweep's two workers do.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from sgdnoise.native import FLAGS

WEIGHTS = 40 * 256 + 256 * 256 + 256 * 10  # the default MLP's weights (the FLOPs' part)
PARAMS = WEIGHTS + 256 + 256 + 10  # and its biases

C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef float v8 __attribute__((vector_size(32)));
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec * 1e-9; }
static double fma_peak(void) { /* 12 independent chains of vector FMAs: FLOP/s of one core */
    v8 a[12], x = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f}, y = x * 1e-7f;
    for (int q = 0; q < 12; q++) a[q] = x * (float)q;
    double best = 1e9;
    for (int r = 0; r < 20; r++) {
        double t = now();
        for (int i = 0; i < 100000; i++)
            for (int q = 0; q < 12; q++) a[q] = a[q] * x + y;
        __asm__ volatile("" : : "x"(a[0]), "x"(a[11]) : "memory");
        double dt = now() - t;
        if (dt < best) best = dt;
    }
    float s = 0.0f;
    for (int q = 0; q < 12; q++) s += a[q][0];
    return 100000.0 * 12 * 16 / best + (s == 12345.0f);
}
int main(int argc, char **argv) {
    if (argc == 2) { printf("%.4g\n", fma_peak()); return 0; }
    int K = atoi(argv[1]), rounds = atoi(argv[2]);
    size_t P = ((size_t)atol(argv[3]) + 15) / 16 * 16;
    float *W = aligned_alloc(64, K * P * 4), *V = aligned_alloc(64, K * P * 4);
    for (size_t i = 0; i < K * P; i++) W[i] = 1e-3f, V[i] = 0.0f;
    double best = 1e9;
    volatile float sink = 0.0f;
    v8 m = {.9f, .9f, .9f, .9f, .9f, .9f, .9f, .9f}, lr = m * 1e-6f;
    for (int r = 0; r < rounds; r++) {
        double t = now();
        for (int k = 0; k < K; k++) {
            v8 *w = (v8 *)(W + k * P), *v = (v8 *)(V + k * P), acc = {0};
            for (size_t i = 0; i < P / 8; i++) acc += w[i];         /* forward: W read */
            for (size_t i = 0; i < P / 8; i++) {                    /* update: W, V read+write */
                v8 vi = m * v[i] + acc * 1e-9f;
                v[i] = vi;
                w[i] -= lr * vi;
            }
            sink += acc[0];
        }
        double dt = (now() - t) / K;
        if (dt < best) best = dt;
    }
    printf("%.3f\n", best * 1e6);
    return 0;
}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=int, default=8, help="members streamed one after another")
    ap.add_argument("--processes", type=int, default=1, help="copies running at once")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--peak", type=float, default=None,
                    help="FLOP/s to set the step's arithmetic against (default: the vector "
                         "FMA peak of one core, measured here)")  # fmt: skip
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="traffic-floor-") as tmp:
        src, exe = Path(tmp) / "floor.c", Path(tmp) / "floor"
        src.write_text(C)
        flags = [f for f in FLAGS if f not in ("-fPIC", "-shared")]
        subprocess.run(["cc", *flags, "-o", str(exe), str(src)], check=True)
        if args.peak is None:
            args.peak = float(subprocess.run([str(exe), "peak"], check=True, text=True,
                                             capture_output=True).stdout)  # fmt: skip
        cmd = [str(exe), str(args.pack), str(args.rounds), str(PARAMS)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                 for _ in range(args.processes)]  # fmt: skip
        times = [float(p.communicate()[0]) for p in procs]
    traffic = 5 * 4 * PARAMS
    print(f"traffic per member-step: {traffic / 1e6:.2f} MB (weights read; weights and "
          f"momentum read and written), packs of {args.pack}, "
          f"{args.processes} process(es)")  # fmt: skip
    for t in times:
        print(f"  {t:.1f} µs per member-step = {traffic / t / 1e3:.1f} GB/s")
    for B in (4, 8):
        flops = 6 * WEIGHTS * B
        at_peak = flops / args.peak * 1e6  # µs
        print(f"B = {B}: the step's {flops / 1e6:.2f} MFLOP take {at_peak:.1f} µs at "
              f"{args.peak / 1e9:.0f} GFLOP/s; the floor is {min(times) / at_peak:.2f}× that")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
