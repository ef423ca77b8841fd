"""Hugging Face model directories without Megatron: the Llama-family config.json (config), the
HF <-> Megatron tensor names and row layouts (mapping), and sliced safetensors reads and sharded
writes (files).  Used by the in-cluster bridge (mcore/hf_bridge.py) and the offline PEFT export
and merge (checkpoint/) alike, so both use one mapping."""
