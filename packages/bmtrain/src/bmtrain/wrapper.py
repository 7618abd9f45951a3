"""``bmtrain.wrapper``: turn a plain torch model into a BMTrain one, in place."""

from bmt_ckpt import BMTrainModelWrapper

__all__ = ["BMTrainModelWrapper"]
