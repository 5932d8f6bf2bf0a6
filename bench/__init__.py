"""The benchmarks, one package: ``make bench`` (``python -m bench``: performance ratios of the 3D-ML system, each
measured side by side), ``make bench-data`` (:mod:`bench.data`: loader speed, padding, data-wait share) and
``make gpu-check`` (:mod:`bench.gpu_check`: tokens/s, MFU and peak memory on the GPUs present).

The items of ``python -m bench`` (:data:`bench.items.ITEMS`): 1 training-step overhead of the Matryoshka views,
2 MEL gather-first vs materialise-then-index, 3 probe of the full grid (one encoding per rank vs a per-cell loop),
4 throughput of an exported shallow model, 5 our loss step vs sentence-transformers' ``Matryoshka2dLoss``, 6 peak
memory and parameters with and without MEL, 7 8-bit vs 32-bit optimizer state, 8 packed vs padded training tokens/s,
9 how cost grows with the grid, 10 exported FFN (MatFormer) cells, 12 latency vs analytic FLOPs of exported
depth × FFN-width cells.
"""
