"""Sampling and scoring machinery the stages share: sampling types, backends (vLLM, the CPU engine,
transformers), worker processes, scorers, embeddings. It imports core only.
"""
