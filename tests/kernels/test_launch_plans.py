"""The host-side launch decisions of the attention kernels: how a decode step splits its contexts, and the
varlen kernel's work list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from tokenmill.kernels.triton_decode_attention import (  # noqa: E402
    MAX_PARTITIONS,
    MIN_PARTITION_TOKENS,
    TARGET_PROGRAMS,
    merge_config,
    num_partitions_for,
)
from tokenmill.kernels.triton_varlen_attention import launch_config, work_items  # noqa: E402


def test_a_lone_long_decode_is_split_to_fill_the_gpu() -> None:
    # Batch 1, 8 KV heads, 32k context: the most partitions allowed, each still long.
    assert num_partitions_for(1, 8, 32768) == MAX_PARTITIONS
    assert 32768 // MAX_PARTITIONS >= MIN_PARTITION_TOKENS


def test_short_contexts_are_not_cut_below_the_minimum_partition() -> None:
    assert num_partitions_for(1, 8, 300) == 3  # ceil(300 / 128)
    assert num_partitions_for(1, 8, 100) == 1


def test_a_full_batch_needs_no_split() -> None:
    assert num_partitions_for(TARGET_PROGRAMS, 1, 32768) == 1
    assert num_partitions_for(64, 8, 4096) == 2  # 512 programs: two partitions reach the target of 528


def test_the_merge_compiles_for_two_tile_sizes_only() -> None:
    sizes = {merge_config(128, p)["BLOCK_P"] for p in range(1, MAX_PARTITIONS + 1)}
    assert sizes == {8, MAX_PARTITIONS}


@pytest.mark.parametrize("group,query_lens", [(4, [20, 1, 0, 5, 70]), (1, [1] * 7), (8, [2048, 1, 1])])
def test_work_items_cover_every_row_exactly_once(group: int, query_lens: list[int]) -> None:
    block_m = launch_config(group, 128, torch.bfloat16)["BLOCK_M"]
    work = work_items(np.array(query_lens), group, 128, torch.bfloat16, torch.device("cpu")).tolist()
    covered = {seq: [] for seq in range(len(query_lens))}
    for seq, tile in work:
        assert tile * block_m < query_lens[seq] * group  # no program that would only exit
        covered[seq].extend(range(tile * block_m, min((tile + 1) * block_m, query_lens[seq] * group)))
    assert all(sorted(rows) == list(range(query_lens[s] * group)) for s, rows in covered.items())
    tiles = [tile for _, tile in work]
    assert tiles == sorted(tiles, reverse=True)  # the tiles that see the most keys start first
