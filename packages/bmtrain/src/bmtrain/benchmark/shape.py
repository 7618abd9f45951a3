"""BMTrain 1.0.1's ``bmtrain.benchmark.shape``: the message sizes its GPU benchmarks use."""

__all__ = ["SHAPES"]

SHAPES: list[int] = [1 << e for e in range(10, 33)]  # 1 KiB .. 4 GiB, bytes; the GPU default sizes
