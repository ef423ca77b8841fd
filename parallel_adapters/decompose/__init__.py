"""Decompositions of tensor-parallel weights that never gather W (docs/design.md section 4b,
"Init by decomposition"): a tall-skinny QR of row-split matrices (`tsqr`), a top-k SVD of a
row-split matrix whose only traffic is its sketches (`split_svd`), and the PiSSA / OLoRA factors
built on them (`pissa`, `olora`), and the exact SVD of a product of split low-rank factors
(`lowrank`, for combining LoRA adapters).  Pure torch plus `distributed.collectives`; every function is a
collective over the group it is given (all ranks call it with same-shaped shards), and a group of
one runs the same code without communicating, so TP=1 and TP=t compute one answer.
"""
