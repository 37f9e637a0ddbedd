"""Multi-LoRA serving: PEFT adapters loaded and checked against the model (adapter.py), per-layer stacked slot
buffers applied by the batched LoRA matmul (layer.py), and the resident adapters' slots (manager.py).
Which adapter sits in which slot each step is the scheduler's decision (core/lora_slots.py)."""
