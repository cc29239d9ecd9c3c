"""Running transformers models: loading (and the converted-GGUF cache), the worker
thread each model runs on, the KV cache structure, prefill planning with prefix reuse,
step batching across sequences, and partial readout of logits. Both sides use it: the
device's two branches (`local`) and the in-process cloud (`remotes.in_process`)."""
