"""The suite's CPU sampler: continuous batching over a slot cache, a compiled decode-attention kernel and
oneDNN pre-packed weights. Used only on the CPU (``backends`` chooses it); importing it changes nothing
in the process, and every process-wide setting it needs is made inside ``stream`` and undone after
(``scoped``). On a GPU, vLLM or transformers' ``generate`` samples instead.
"""

from .engine import Decoding, Finished, SlotCache, slot_attention, stream

__all__ = ["Decoding", "Finished", "SlotCache", "slot_attention", "stream"]
