"""``bmtrain.pipe_layer``: a block list split into pipeline stages."""

from bmt_ckpt import PipelineTransformerBlockList

__all__ = ["PipelineTransformerBlockList"]
