"""MFU's halves: the analytic model FLOPs of a step (hand-computed) and the device peak."""

import pytest
import torch

from contracts.batch_layout import pack, pad
from lightning_modules.flops import measured_cpu_peak_flops, peak_flops, spec_peak_flops, text_lengths, training_flops


def test_training_flops_counts_weights_attention_and_views():
    # texts of 2 and 3 tokens; 10 dense parameters, 2 blocks of attention width 4; views of widths 8 and 4;
    # 1 query with 3 scores per view
    flops = training_flops(torch.tensor([2, 3]), 10, 2, 4, [8, 4], 1, 3)
    assert flops == 6 * 10 * 5 + 12 * 2 * 4 * (2**2 + 3**2) + 6 * 1 * 3 * (8 + 4)


def test_packed_and_padded_batches_of_the_same_texts_have_the_same_lengths():
    sequences = [[5, 6, 7], [8], [9, 9], [4, 4, 4, 4]]
    padded, packed = pad(sequences, 0), pack(sequences, 0)
    assert sorted(text_lengths(padded).tolist()) == sorted(text_lengths(packed).tolist()) == [1, 2, 3, 4]


def test_peaks():
    assert spec_peak_flops("NVIDIA H100 PCIe") == 756e12 and spec_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert spec_peak_flops("Tesla T4") is None
    measured = peak_flops(torch.device("cpu"))
    assert 1e8 < measured < 1e14  # a CPU core does 1e9-1e11 FLOP/s
    assert peak_flops(torch.device("cpu")) == measured == measured_cpu_peak_flops(torch.get_num_threads())  # cached
