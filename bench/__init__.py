"""``make bench`` (``python -m bench``): performance ratios of the 3D-ML system, each measured side by side.

Items (issue 6): 1 training-step overhead of the Matryoshka views, 2 MEL gather-first vs materialise-then-index,
3 probe of the full grid (one encoding per rank vs a per-cell loop), 4 throughput of an exported shallow model,
5 our loss step vs sentence-transformers' ``Matryoshka2dLoss``, 6 peak memory and parameters with and without MEL.
"""
