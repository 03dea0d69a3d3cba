"""The suite's CPU sampler: continuous batching over a slot cache (``engine``), a compiled decode-attention
kernel (``kernels``) and oneDNN pre-packed weights (``scoped``). Used only on the CPU (``backends`` chooses it);
importing it changes nothing in the process, and every process-wide setting it needs is made inside
``engine.stream`` and undone after. On a GPU, vLLM or transformers' ``generate`` samples instead.
"""
