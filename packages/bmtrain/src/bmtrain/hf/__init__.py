"""``bmtrain.hf``: Hugging Face transformers models and weights.

- :func:`from_config` / :func:`from_pretrained`: build a transformers model on ``meta`` and wrap
  it, so that each rank allocates only its shards;
- :func:`save_pretrained`: export any sharded model (ZeRO, tensor- or pipeline-parallel) as a
  safetensors directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads;
- :func:`load_pretrained`: import such a directory, each rank reading only its own slices;
- :class:`KeyMapping`: renames (and row orders) between a model's keys and a file's, e.g.
  :func:`llama_example_mapping` for ``bmtrain.examples.llama``.

transformers is imported only by the functions that need it (``from_config``, the config helpers).
"""

from .keys import KeyMapping, KeyRule, interleaved_to_halves
from .llama import llama_example_hf_config, llama_example_mapping
from .load import LoadResult, load_pretrained
from .meta import from_config, from_pretrained, parameters_on_meta
from .save import save_pretrained

__all__ = [
    "KeyMapping",
    "KeyRule",
    "LoadResult",
    "from_config",
    "from_pretrained",
    "interleaved_to_halves",
    "llama_example_hf_config",
    "llama_example_mapping",
    "load_pretrained",
    "parameters_on_meta",
    "save_pretrained",
]
