"""Packing and data-parallel sampling.  Oracle: the token stream itself."""
import torch

from parallel_adapters.train.data import LABEL_MASK_VALUE, ByteTokenizer, DataParallelBatches, pack


def test_pack_shifts_labels_and_masks_across_documents():
    eos = 99
    samples = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=eos)
    stream = [1, 2, 3, eos, 4, 5, eos, 6, 7, 8, 9, eos]
    assert samples.shape == (2, 2, 4)
    inputs, labels = samples[:, 0].flatten().tolist(), samples[:, 1].flatten().tolist()
    assert inputs == stream[:8]
    for i, (tok, label) in enumerate(zip(inputs, labels)):
        assert label == (LABEL_MASK_VALUE if tok == eos else stream[i + 1])


def test_global_batch_is_split_disjointly_over_dp_ranks():
    tok = ByteTokenizer()
    samples = pack([tok.encode("abcdefghij" * 20)], seq_len=8, eos_id=tok.eos_id)
    whole = DataParallelBatches(samples, 4, 0, 1, seed=3).next_batch()["input_ids"]
    halves = [DataParallelBatches(samples, 2, r, 2, seed=3).next_batch()["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
