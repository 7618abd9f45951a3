"""Resume a training run: kill it, start the same command again, and it goes on bitwise.

    torchrun --standalone --nproc_per_node 2 examples/resume.py --dir ckpt/run1 --steps 40
    torchrun --standalone --nproc_per_node 2 examples/resume.py --dir ckpt/run1 --steps 40 --stop-at 25
    torchrun --standalone --nproc_per_node 2 examples/resume.py --dir ckpt/run1 --steps 40   # resumes at 20

Without GPUs it runs on the CPU (gloo). A small model of Blocks with dropout trains on random
batches; every ``--save-every`` steps ``bmt.save_checkpoint`` writes the model, the optimizer,
the LR scheduler, the loss scale, every rank's RNG states and the data position; at start
``bmt.load_checkpoint`` restores the newest one (``missing_ok``: a first run starts from step 0).
Each step's loss is printed by rank 0 as ``step N loss X`` (``float.hex``: bitwise comparable).

The data must resume too: here each step's batch is a function of (seed, step, rank), so the
step number is the data position. A real loader saves its position in ``extra=``.
"""

from __future__ import annotations

import argparse

import bmtrain as bmt
import torch
import torch.nn.functional as F

DIM, VOCAB = 64, 97


class Layer(bmt.DistributedModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = bmt.nn.Linear(DIM, 4 * DIM)
        self.fc2 = bmt.nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(x))), p=0.1, training=self.training)


class Model(bmt.DistributedModule):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed = bmt.DistributedParameter(torch.empty(VOCAB, DIM), init_method=bmt.ParameterInitializer(torch.nn.init.normal_, std=0.02))
        self.layers = bmt.TransformerBlockList([bmt.Block(Layer()) for _ in range(layers)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = F.embedding(ids, self.embed)
        return F.linear(self.layers(x), self.embed)  # tied output head


def batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (8, 17), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", required=True, help="checkpoint root (holds step-XXXXXXXX directories and latest)")
    p.add_argument("--steps", type=int, default=40, help="train until this step")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--stop-at", type=int, default=None, help="exit after this step, as a killed job would")
    p.add_argument("--layers", type=int, default=3)
    args = p.parse_args()

    bmt.init_distributed(seed=0)
    device = bmt.config["device"]
    model = Model(args.layers)
    bmt.init_parameters(model)
    optimizer = bmt.optim.AdamOptimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = bmt.lr_scheduler.Cosine(optimizer, start_lr=1e-3, warmup_iter=5, end_iter=args.steps)
    manager = bmt.optim.OptimManager(loss_scale=None)
    manager.add_optimizer(optimizer, scheduler)

    info = bmt.load_checkpoint(args.dir, model, manager, missing_ok=True)
    start = 0 if info is None else info.step
    bmt.print_rank(f"starting at step {start}" + ("" if info is None else f" from {info.path}"))

    model.train()
    for step in range(start, args.steps):
        ids, targets = batch(step, bmt.rank(), device)
        loss = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten())
        manager.zero_grad()
        manager.backward(loss)
        manager.step()
        total = bmt.sum_loss(loss.detach()).item()  # the mean over ranks
        bmt.print_rank(f"step {step + 1} loss {float(total).hex()}")
        if (step + 1) % args.save_every == 0:
            bmt.save_checkpoint(args.dir, model, manager, step=step + 1, keep_last=args.keep_last)
        if args.stop_at is not None and step + 1 == args.stop_at:
            bmt.print_rank(f"stopping after step {step + 1}")
            return


if __name__ == "__main__":
    main()
