import pytest

from tokenmill.core.block_pool import BlockPool


def test_blocks_are_handed_out_in_order_and_counted():
    pool = BlockPool(4)
    taken = [pool.pop_free() for _ in range(3)]
    assert [b.block_id for b in taken] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in taken)
    assert pool.num_free_blocks == 1
    assert pool.num_used_blocks == 3


def test_released_blocks_join_the_back_of_the_free_queue():
    pool = BlockPool(4)
    a, b, c = (pool.pop_free() for _ in range(3))
    pool.release(b)
    pool.release(a)
    assert pool.free_block_ids() == [3, 1, 0]
    assert pool.pop_free().block_id == 3
    assert pool.pop_free().block_id == 1


def test_touching_a_free_block_removes_it_from_the_queue():
    pool = BlockPool(3)
    a = pool.pop_free()
    pool.release(a)
    assert pool.free_block_ids() == [1, 2, 0]
    pool.touch(a)
    assert a.ref_count == 1
    assert pool.free_block_ids() == [1, 2]
    pool.touch(a)
    assert a.ref_count == 2
    pool.release(a)
    assert pool.free_block_ids() == [1, 2]
    pool.release(a)
    assert pool.free_block_ids() == [1, 2, 0]


def test_double_release_is_an_error():
    pool = BlockPool(2)
    a = pool.pop_free()
    pool.release(a)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a)


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockPool(0)
