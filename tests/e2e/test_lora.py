"""Multi-LoRA serving offline: every request's greedy output equals peft's merged model's, token for token, in
batches that mix adapters of several ranks and the base model; with fewer slots than adapters (LRU swaps); the
prefix cache never crosses adapters; bad adapters and names get errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint
from tests.e2e.conftest import make_prompts
from tests.lora_adapters import make_peft_adapter, merged_greedy
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError, InvalidRequestError

NUM_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    base = make_checkpoint("llama", root / "base")  # head_dim 24, GQA: q/k/v slices of unequal width
    adapters = {
        "r1-attn": make_peft_adapter(base, root / "r1", rank=1, seed=1, targets=("q_proj", "k_proj", "v_proj")),
        "r4-all": make_peft_adapter(base, root / "r4", rank=4, seed=2),
        "r8-mix": make_peft_adapter(base, root / "r8", rank=8, seed=3, targets=("q_proj", "v_proj", "down_proj")),
        "r16-rs": make_peft_adapter(base, root / "r16", rank=16, seed=4, use_rslora=True,
                                    targets=("o_proj", "gate_proj", "up_proj")),
        "pattern": make_peft_adapter(base, root / "pattern", rank=6, seed=5, rank_pattern={"down_proj": 2}),
    }
    prompts = make_prompts(lengths=[3, 20, 41])
    expected = {name: merged_greedy(base, path, prompts, NUM_TOKENS) for name, path in adapters.items()}
    expected[None] = merged_greedy(base, None, prompts, NUM_TOKENS)
    return {"root": root, "base": base, "adapters": adapters, "prompts": prompts, "expected": expected}


def _llm(setup: dict, max_loras: int, **kwargs) -> LLM:
    modules = [f"{name}={path}" for name, path in setup["adapters"].items()]
    return LLM(model=str(setup["base"]), dtype="float32", max_model_len=256, enable_lora=True, max_loras=max_loras,
               max_lora_rank=16, lora_modules=modules, **kwargs)


def _mixed_batch(setup: dict) -> tuple[list[dict], list[str | None]]:
    names = [*setup["adapters"], None]
    prompts = [{"prompt_token_ids": p} for _ in names for p in setup["prompts"]]
    return prompts, [name for name in names for _ in setup["prompts"]]


def _check_outputs(setup: dict, outputs: list, names: list[str | None]) -> None:
    count = len(setup["prompts"])
    for index, (output, name) in enumerate(zip(outputs, names)):
        assert output.outputs[0].token_ids == setup["expected"][name][index % count], f"adapter {name}, prompt {index}"


def test_adapters_change_the_output(lora_setup: dict) -> None:
    """The references differ from the base model's and from each other: an engine ignoring adapters would fail."""
    firsts = {name: tuple(tokens[0]) for name, tokens in lora_setup["expected"].items()}
    assert len(set(firsts.values())) == len(firsts)


def test_mixed_batch_of_adapters_and_base_equals_peft_merged(lora_setup: dict) -> None:
    llm = _llm(lora_setup, max_loras=len(lora_setup["adapters"]))
    prompts, names = _mixed_batch(lora_setup)
    outputs = llm.generate(prompts, GREEDY, lora_name=names)
    _check_outputs(lora_setup, outputs, names)
    assert llm.engine.scheduler.lora_slots.num_loads == len(lora_setup["adapters"])  # all resident, loaded once


def test_fewer_slots_than_adapters_swaps_lru_and_stays_exact(lora_setup: dict) -> None:
    llm = _llm(lora_setup, max_loras=2)
    prompts, names = _mixed_batch(lora_setup)
    outputs = llm.generate(prompts, GREEDY, lora_name=names)
    _check_outputs(lora_setup, outputs, names)
    assert llm.engine.scheduler.lora_slots.num_loads >= len(lora_setup["adapters"])
    # Again, in another order: the slots now hold the last two adapters, the others come back by eviction.
    outputs = llm.generate(prompts[::-1], GREEDY, lora_name=names[::-1])
    _check_outputs(lora_setup, outputs[::-1], names)
    assert llm.engine.scheduler.lora_slots.num_loads > len(lora_setup["adapters"])


def test_asynchronous_scheduling_places_slots_ahead_and_stays_exact(lora_setup: dict) -> None:
    """Step n+1 is planned (its slots placed, an adapter evicted) while step n runs: each step still runs its own
    adapters, since the worker fills a planned step's slots only when it executes it."""
    llm = _llm(lora_setup, max_loras=2, async_scheduling=True)
    assert llm.engine.async_scheduling
    prompts, names = _mixed_batch(lora_setup)
    _check_outputs(lora_setup, llm.generate(prompts, GREEDY, lora_name=names), names)


def test_adapters_apply_over_a_quantized_base(lora_setup: dict) -> None:
    """The delta is added after the base layer's quant method: an int8 base keeps its own outputs for base-model
    requests, and the adapter's delta still lands (over int8 weights there is no exact reference to equal)."""
    prompts = [{"prompt_token_ids": p} for p in lora_setup["prompts"]]
    plain = LLM(model=str(lora_setup["base"]), dtype="float32", max_model_len=256, quantization="int8")
    with_lora = _llm(lora_setup, max_loras=2, quantization="int8")
    base_outputs = plain.generate(prompts, GREEDY)
    mixed = with_lora.generate(prompts + prompts, GREEDY, lora_name=[None] * 3 + ["r4-all"] * 3)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in base_outputs]
    adapted = [o.outputs[0].token_ids for o in mixed[3:]]
    assert all(a != o.outputs[0].token_ids for a, o in zip(adapted, base_outputs))


def test_prefix_cache_never_crosses_adapters(lora_setup: dict) -> None:
    llm = _llm(lora_setup, max_loras=2, block_size=16)
    prompt = {"prompt_token_ids": make_prompts(lengths=[70], seed=9)[0]}
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def cached(name: str | None) -> int:
        return llm.generate(prompt, one, lora_name=name)[0].num_cached_tokens

    assert cached("r4-all") == 0
    assert cached("r4-all") == 64  # the same adapter hits its four full blocks
    assert cached("r8-mix") == 0  # another adapter computes its own KV
    assert cached(None) == 0  # and so does the base model
    assert cached(None) == 64
    assert cached("r8-mix") == 64
    llm.load_lora("r4-again", str(lora_setup["adapters"]["r4-all"]))  # the same files under another name
    assert cached("r4-again") == 64


def test_adapters_load_and_unload_at_run_time(lora_setup: dict) -> None:
    llm = LLM(model=str(lora_setup["base"]), dtype="float32", max_model_len=256, enable_lora=True, max_loras=1,
              max_lora_rank=8)
    prompt = {"prompt_token_ids": lora_setup["prompts"][1]}
    with pytest.raises(InvalidRequestError) as unknown:
        llm.generate(prompt, GREEDY, lora_name="r4-all")
    assert unknown.value.field == "lora_name" and "no adapter named 'r4-all'" in str(unknown.value)
    llm.load_lora("r4-all", str(lora_setup["adapters"]["r4-all"]))
    output = llm.generate(prompt, GREEDY, lora_name="r4-all")[0]
    assert output.outputs[0].token_ids == lora_setup["expected"]["r4-all"][1]
    with pytest.raises(InvalidRequestError, match="already loaded"):
        llm.load_lora("r4-all", str(lora_setup["adapters"]["r8-mix"]))
    stream = llm.stream(prompt, GREEDY, lora_name="r4-all")
    next(stream)  # the request is running
    with pytest.raises(InvalidRequestError, match="in use"):
        llm.unload_lora("r4-all")
    stream.close()
    llm.unload_lora("r4-all")
    with pytest.raises(InvalidRequestError, match="no adapter named 'r4-all'"):
        llm.generate(prompt, GREEDY, lora_name="r4-all")


def test_bad_adapters_are_refused_naming_the_field(lora_setup: dict, tmp_path: Path) -> None:
    llm = LLM(model=str(lora_setup["base"]), dtype="float32", max_model_len=256, enable_lora=True, max_loras=1,
              max_lora_rank=8)
    other_base = make_checkpoint("llama", tmp_path / "other", hidden_size=32, intermediate_size=64)
    wrong_shape = make_peft_adapter(other_base, tmp_path / "wrong", rank=4, seed=6)
    cases = {
        str(wrong_shape): "an adapter of another base model",
        str(tmp_path / "missing"): "cannot read",
        str(lora_setup["adapters"]["r16-rs"]): "rank 16 exceeds max_lora_rank 8",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidRequestError, match=message) as error:
            llm.load_lora("bad", path)
        assert error.value.field == "lora_path"
    embed = tmp_path / "embed"
    make_peft_adapter(lora_setup["base"], embed, rank=2, seed=7, targets=("q_proj", "embed_tokens"))
    with pytest.raises(InvalidRequestError, match="not a LoRA A/B weight") as error:
        llm.load_lora("bad", str(embed))
    assert llm.engine.lora.names() == []
    config = json.loads((lora_setup["adapters"]["r4-all"] / "adapter_config.json").read_text())
    assert config["r"] == 4  # the folders are real PEFT output


def test_lora_settings_are_checked_at_start(lora_setup: dict) -> None:
    base = str(lora_setup["base"])
    with pytest.raises(ConfigError, match="needs enable_lora"):
        LLM(model=base, lora_modules=["a=/x"])
    with pytest.raises(ConfigError, match="NAME=PATH"):
        LLM(model=base, enable_lora=True, lora_modules=["just-a-path"])
    with pytest.raises(ConfigError, match="lora_modules: a=/nowhere: cannot read"):
        LLM(model=base, enable_lora=True, lora_modules=["a=/nowhere"])
    with pytest.raises(ConfigError, match="max_loras"):
        LLM(model=base, enable_lora=True, max_loras=0)
    llm = LLM(model=base, dtype="float32", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="not enabled") as error:
        llm.generate({"prompt_token_ids": [9, 10]}, GREEDY, lora_name="x")
    assert error.value.field == "lora_name"


def test_a_batch_of_32_over_8_adapters_and_the_base_gives_each_its_own_output(lora_setup: dict,
                                                                               tmp_path: Path) -> None:
    """The issue's acceptance batch: 32 requests over 8 adapters and the base model, one generate call."""
    base = lora_setup["base"]
    adapters = {f"a{i}": make_peft_adapter(base, tmp_path / f"a{i}", rank=1 + 2 * i, seed=100 + i) for i in range(8)}
    prompts = make_prompts(lengths=[5, 9, 14, 22], seed=7)
    names: list[str | None] = [*adapters, None]
    expected = {name: merged_greedy(base, adapters.get(name) if name else None, prompts, NUM_TOKENS)
                for name in names}
    requests = [(names[i % len(names)], i % len(prompts)) for i in range(32)]
    llm = LLM(model=str(base), dtype="float32", max_model_len=256, enable_lora=True, max_loras=8, max_lora_rank=16,
              lora_modules=[f"{name}={path}" for name, path in adapters.items()])
    outputs = llm.generate([{"prompt_token_ids": prompts[p]} for _, p in requests], GREEDY,
                           lora_name=[name for name, _ in requests])
    for (name, p), output in zip(requests, outputs):
        assert output.outputs[0].token_ids == expected[name][p], f"adapter {name}, prompt {p}"
    assert len({tuple(expected[name][0]) for name in names}) == len(names)  # every adapter changes the output
