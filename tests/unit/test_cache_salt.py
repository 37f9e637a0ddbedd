"""Cache salts isolate the prefix cache: salted hashes chain from a salt-derived root, hits never cross salts."""

import hashlib
import os
import subprocess
import sys

import pytest

from tokenmill.core.kv_manager import KVCacheManager
from tokenmill.core.prefix_cache import extend_block_hashes, hash_block, salt_root
from tokenmill.core.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.input_checks import MAX_CACHE_SALT_CHARS, check_cache_salt
from tokenmill.llm import with_cache_salt
from tokenmill.sampling_params import SamplingParams

BS = 4
PROMPT = list(range(10))  # two full blocks and two tokens


def make_request(rid: str, tokens: list[int], salt: str | None) -> Request:
    return Request(rid, tokens, SamplingParams(), cache_salt=salt)


def run_prefill(kv: KVCacheManager, req: Request) -> int:
    """Admit like the scheduler does, compute the whole prompt, cache full blocks. Returns the hit."""
    blocks, hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - hit, blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return hit


def test_salted_hashes_differ_and_chain_from_the_salt_root():
    unsalted: list[bytes] = []
    extend_block_hashes(unsalted, PROMPT, BS)
    salted: list[bytes] = []
    extend_block_hashes(salted, PROMPT, BS, salt_root("tenant-a"))
    other: list[bytes] = []
    extend_block_hashes(other, PROMPT, BS, salt_root("tenant-b"))
    assert len(salted) == 2 and len(set(unsalted) | set(salted) | set(other)) == 6
    # The salt feeds only the first block's parent; later blocks are salted through the chain.
    assert salted[0] == hash_block(salt_root("tenant-a"), PROMPT[:4])
    assert salted[1] == hash_block(salted[0], PROMPT[4:8])
    assert salt_root(None) is None and unsalted[0] == hash_block(None, PROMPT[:4])


def test_the_salt_root_is_blake2b_and_stable_across_processes():
    # The disk tier keys files by these hashes, so a new process must derive the same bytes.
    expected = hashlib.blake2b(b"tenant-a", digest_size=16, person=b"tokenmill-salt").digest()
    assert salt_root("tenant-a") == expected
    code = "from tokenmill.core.prefix_cache import salt_root, hash_block; " \
           "print(hash_block(salt_root('tenant-a'), [1, 2, 3, 4]).hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == hash_block(expected, [1, 2, 3, 4]).hex()


def test_same_prompt_two_salts_gets_no_hit_and_own_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    assert run_prefill(kv, make_request("a", PROMPT, "tenant-a")) == 0
    b = make_request("b", PROMPT, "tenant-b")
    assert run_prefill(kv, b) == 0
    assert b.num_computed_tokens == 10
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == [3, 4, 5]
    assert len(kv.cache) == 4  # each salt registered its own two full blocks
    unsalted = make_request("c", PROMPT, None)
    assert run_prefill(kv, unsalted) == 0 and kv.block_ids("c") == [6, 7, 8]


def test_same_salt_hits_the_same_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run_prefill(kv, make_request("a", PROMPT, "tenant-a"))
    b = make_request("b", PROMPT, "tenant-a")
    assert run_prefill(kv, b) == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2] == [0, 1]
    assert kv.block_ids("b")[2:] == [3]


def test_a_freed_salted_block_serves_only_its_salt():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", PROMPT, "tenant-a")
    run_prefill(kv, a)
    kv.free(a)
    assert run_prefill(kv, make_request("b", PROMPT, "tenant-b")) == 0
    assert run_prefill(kv, make_request("c", PROMPT, "tenant-a")) == 8


def test_decode_blocks_stay_salted():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", [1, 2, 3], "s")
    run_prefill(kv, a)
    for token in (4, 5, 6, 7, 8):  # generated tokens fill the first two blocks
        a.append_output_token(token)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_full_blocks(a)
    assert len(kv.cache) == 2
    again = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], "s")
    assert run_prefill(kv, again) == 8
    stranger = make_request("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], None)
    assert run_prefill(kv, stranger) == 0


@pytest.mark.parametrize(("value", "message"), [
    (42, "must be a string"),
    ("", f"1 to {MAX_CACHE_SALT_CHARS} characters, got 0"),
    ("x" * (MAX_CACHE_SALT_CHARS + 1), f"1 to {MAX_CACHE_SALT_CHARS} characters, got {MAX_CACHE_SALT_CHARS + 1}"),
    ("a\ud800", "lone UTF-16 surrogate"),
])
def test_bad_salts_name_the_field_and_the_limit(value, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        check_cache_salt(value)
    assert info.value.field == "cache_salt"


def test_llm_salt_argument_wraps_every_prompt_form():
    assert with_cache_salt("hi", None) == "hi"
    assert with_cache_salt("hi", "s") == {"prompt": "hi", "cache_salt": "s"}
    assert with_cache_salt([1, 2], "s") == {"prompt_token_ids": [1, 2], "cache_salt": "s"}
    assert with_cache_salt({"prompt": "hi", "cache_salt": "s"}, "s") == {"prompt": "hi", "cache_salt": "s"}
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        with_cache_salt({"prompt": "hi", "cache_salt": "t"}, "s")
