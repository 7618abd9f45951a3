"""Example models written with the BMTrain API, a tiny corpus, and the training entry point.

- :mod:`bmtrain.examples.gpt`: a GPT-2 style decoder (LayerNorm, GELU MLP, tied embeddings);
- :mod:`bmtrain.examples.llama`: a Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU,
  grouped-query attention);
- :mod:`bmtrain.examples.data`: a character-level corpus shipped with the package;
- ``python -m bmtrain.examples.train`` (or ``bmtrain-train``): train either one; without
  ``torchrun`` it launches itself on every local GPU (NCCL), else on 2 CPU processes (gloo).
"""

__all__: list[str] = []
