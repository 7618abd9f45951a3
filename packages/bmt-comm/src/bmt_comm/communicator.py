"""The ``Communicator`` interface that everything above bmt-comm talks to.

Two implementations: :class:`bmt_comm.torch_communicator.TorchCommunicator` (torch.distributed,
gloo on CPU) and :class:`bmt_comm.nccl.NcclCommunicator` (NCCL loaded at run time, GPU tensors,
enqueued on the caller's current CUDA stream). Both validate their arguments the same way, here,
so the error a user sees does not depend on the transport.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from enum import Enum

import torch

__all__ = ["Backend", "Communicator", "ReduceOp", "check_same_dtype", "check_device", "check_contiguous"]


class Backend(str, Enum):
    """Which transport ``init_distributed`` picked (``bmt.config["backend"]``).

    A ``str`` enum, so a comparison with the strings of earlier releases (``== "nccl"``) holds.
    """

    NCCL = "nccl"  # bmt's runtime-loaded NCCL (bmt_comm.nccl.NcclCommunicator), on GPUs
    TORCH = "torch"  # torch.distributed (TorchCommunicator): gloo on CPU, or BMT_COMM_BACKEND=torch

    def __str__(self) -> str:  # prints as the plain string it was before
        return str(self.value)


class ReduceOp(str, Enum):
    SUM = "sum"
    PROD = "prod"
    MAX = "max"
    MIN = "min"
    AVG = "avg"

    @classmethod
    def parse(cls, op: ReduceOp | str) -> ReduceOp:
        if isinstance(op, ReduceOp):
            return op
        if not isinstance(op, str):
            raise TypeError(f"reduce op must be a ReduceOp or a string, got {type(op).__name__} {op!r}")
        try:
            return cls(op.lower())
        except ValueError:
            raise ValueError(
                f"reduce op must be one of {[o.value for o in cls]}, got {op!r}"
            ) from None


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            f"call .contiguous() first"
        )


def check_same_dtype(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} dtype ({a.dtype}) must equal {b_name} dtype ({b.dtype})")


def check_device(name: str, t: torch.Tensor, expected: torch.device) -> None:
    if not _same_device(t.device, expected):
        raise ValueError(
            f"{name} is on {t.device} but this communicator works on {expected}"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ai = a.index if a.index is not None else torch.cuda.current_device()
        bi = b.index if b.index is not None else torch.cuda.current_device()
        return ai == bi
    return True


class Communicator(ABC):
    """A fixed group of ranks that run collectives together.

    Ranks passed to ``broadcast``/``reduce``/``send``/``recv`` are ranks *inside* this group.
    Every call is collective over the group except ``send``/``recv``.
    """

    # set by each transport's constructor
    _ranks: tuple[int, ...]
    _rank: int
    _device: torch.device

    @property
    def rank(self) -> int:
        """This process's rank inside the group."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of ranks in the group."""
        return len(self._ranks)

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """Global ranks of the members, indexed by group rank."""
        return self._ranks

    @property
    def device(self) -> torch.device:
        """The device whose tensors this communicator accepts."""
        return self._device

    # --- collectives (implemented by transports) --------------------------------------
    @abstractmethod
    def _all_gather(self, input: torch.Tensor, output: torch.Tensor) -> None: ...

    @abstractmethod
    def _reduce_scatter(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None: ...

    @abstractmethod
    def _all_reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> None: ...

    @abstractmethod
    def _broadcast(self, input: torch.Tensor, output: torch.Tensor, root: int) -> None: ...

    @abstractmethod
    def _reduce(self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp, root: int) -> None: ...

    @abstractmethod
    def _send(self, tensor: torch.Tensor, peer: int) -> None: ...

    @abstractmethod
    def _recv(self, tensor: torch.Tensor, peer: int) -> None: ...

    @abstractmethod
    def _group(self) -> contextlib.AbstractContextManager[None]: ...

    # --- validated public API ---------------------------------------------------------
    def all_gather(self, input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``input`` (flattened, rank order) into ``output``.

        ``output.numel()`` must be ``size * input.numel()``; its shape is free.
        """
        self._check_pair("input", input, "output", output)
        if output.numel() != input.numel() * self.size:
            raise ValueError(
                f"all_gather output numel ({output.numel()}) must be group size ({self.size}) "
                f"* input numel ({input.numel()})"
            )
        self._all_gather(input, output)
        return output

    def reduce_scatter(
        self, input: torch.Tensor, output: torch.Tensor, op: ReduceOp | str = ReduceOp.SUM
    ) -> torch.Tensor:
        """Reduce ``input`` over ranks; rank ``r`` receives the ``r``-th of ``size`` equal chunks."""
        self._check_pair("input", input, "output", output)
        if input.numel() != output.numel() * self.size:
            raise ValueError(
                f"reduce_scatter input numel ({input.numel()}) must be group size ({self.size}) "
                f"* output numel ({output.numel()})"
            )
        self._reduce_scatter(input, output, ReduceOp.parse(op))
        return output

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reduce over ranks into ``output`` (in place when ``output`` is None)."""
        out = tensor if output is None else output
        self._check_pair("input", tensor, "output", out, same_numel=True)
        self._all_reduce(tensor, out, ReduceOp.parse(op))
        return out

    def broadcast(
        self, tensor: torch.Tensor, root: int, output: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Root's ``tensor`` lands in ``output`` (in place when None) on every rank."""
        self._check_root(root)
        out = tensor if output is None else output
        self._check_pair("input", tensor, "output", out, same_numel=True)
        self._broadcast(tensor, out, root)
        return out

    def reduce(
        self,
        tensor: torch.Tensor,
        root: int,
        op: ReduceOp | str = ReduceOp.SUM,
        output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reduce over ranks; only ``root``'s ``output`` (in place when None) is defined."""
        self._check_root(root)
        out = tensor if output is None else output
        self._check_pair("input", tensor, "output", out, same_numel=True)
        self._reduce(tensor, out, ReduceOp.parse(op), root)
        return out

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._check_peer(peer)
        self._check_one("tensor", tensor)
        self._send(tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        self._check_peer(peer)
        self._check_one("tensor", tensor)
        self._recv(tensor, peer)
        return tensor

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Batch the calls made inside into one launch (ncclGroupStart/End)."""
        with self._group():
            yield

    def close(self) -> None:
        """Release what the transport holds (``bmt_comm.destroy()`` calls it); default: nothing."""
        return None

    def barrier(self) -> None:
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._all_reduce(flag, flag, ReduceOp.SUM)

    # --- checks ------------------------------------------------------------------------
    def _check_one(self, name: str, t: torch.Tensor) -> None:
        check_contiguous(name, t)
        check_device(name, t, self.device)

    def _check_pair(
        self, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, same_numel: bool = False
    ) -> None:
        self._check_one(a_name, a)
        self._check_one(b_name, b)
        check_same_dtype(a_name, a, b_name, b)
        if same_numel and a.numel() != b.numel():
            raise ValueError(f"{a_name} numel ({a.numel()}) must equal {b_name} numel ({b.numel()})")

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"root ({root}) must be a rank in [0, {self.size}) of this group")

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(
                f"peer ({peer}) must be another rank in [0, {self.size}) of this group "
                f"(this rank is {self.rank})"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
            f"ranks={list(self.global_ranks)}, device={self.device})"
        )
