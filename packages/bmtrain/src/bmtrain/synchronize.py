"""``bmtrain.synchronize``: host barrier and the reference's loss/result helpers."""

from bmt_comm import gather_result, sum_loss, synchronize, wait_loader

__all__ = ["synchronize", "wait_loader", "sum_loss", "gather_result"]
