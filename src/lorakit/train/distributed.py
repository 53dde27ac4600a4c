"""Multi-process training on `torch.distributed`: DDP or FSDP2 data parallelism for `lorakit train`.

Launch:

    lorakit train --nproc-per-node N ...                      # spawns torchrun (one node)
    torchrun --nproc-per-node N -m lorakit train ...          # the plain form; add --nnodes, --node-rank,
                                                              # --rdzv-endpoint for several nodes

Every process loads the base model and the data (the split is deterministic), injects the
same adapter (same seed), and trains on its own slice of each global micro-batch: the data
stream is the single-process stream of micro-batches of `batch_size * world_size` examples
(`data.batches`), and rank r takes examples `[r * batch_size, (r + 1) * batch_size)` of each.
So N processes with `batch_size` b take the same optimizer steps as one process with
`batch_size` N * b, up to float rounding, when each example carries the same weight in the
loss (the loss of a micro-batch is its mean; the processes' gradients are averaged).

- `parallel: ddp` (default): `DistributedDataParallel`; the frozen base parameters and all
  buffers are excluded from DDP (`_set_params_and_buffers_to_ignore_for_model`), so only the
  trainable tensors (LoRA A/B, DoRA magnitudes, `modules_to_save` copies) are broadcast at
  start and all-reduced after backward. A counting comm hook records what is reduced.
- `parallel: fsdp2`: `torch.distributed.fsdp.fully_shard` on each block of the model's layer
  lists and on the root, with the trainable tensors as `ignored_params`: the frozen base is
  sharded across the processes (all-gathered per block for forward and backward), while the
  adapters stay whole on every process and their gradients are all-reduced here after the
  last micro-batch (one flat buffer). bitsandbytes `Linear4bit` (QLoRA) bases cannot be
  sharded this way: that combination is refused with a clear error.

Rank 0 alone writes checkpoints, the adapter and the report; the other processes return
after training. Backends: gloo on the CPU, nccl on GPUs (one GPU per process, `LOCAL_RANK`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import RecipeError


@dataclass(frozen=True)
class World:
    """What torchrun tells a process (environment variables RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def world_from_env(env: dict[str, str] | None = None) -> World | None:
    """The `World` of a process started by torchrun with more than one process, else None."""
    env = os.environ if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world_size <= 1:
        return None
    rank = int(env["RANK"])
    return World(rank, world_size, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world_size)))


def check_supported(recipe, world_size: int) -> None:
    """Refuse the combinations that cannot work. Raises `RecipeError`."""
    if world_size > 1 and recipe.parallel == "fsdp2" and recipe.quantize == "nf4":
        raise RecipeError("parallel 'fsdp2' with quantize 'nf4' is not supported: FSDP2 (fully_shard) cannot shard "
                          "bitsandbytes "
                          "Linear4bit weights (packed Params4bit with a separate quantization state); use --parallel "
                          "ddp with nf4")


def threads_per_process(threads: int | None, local_world_size: int) -> int:
    """`threads`, or the CPUs this process may use shared evenly among the processes of its node."""
    if threads is not None:
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world_size))


def trainable_sha256(model: nn.Module) -> str:
    """sha256 over the trainable tensors' names and bytes: equal on every rank when the ranks agree."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Distributed:
    """One process of a multi-process run: the process group, the model wrapper, the collectives.

    The training loop uses `is_main`, `rank`, `world_size`, `no_sync`, `reduce_gradients` and
    `sum`; the job uses `wrap`, `gather` and `close`. `reduced` counts the gradient all-reduces
    (`calls`, `tensors`, `numel`): with DDP as reported by its comm hook, with FSDP2 here.
    """

    def __init__(self, world: World, parallel: str, device: torch.device):
        import torch.distributed as dist

        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.is_main = self.rank == 0
        self.parallel = parallel
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    device_id=device if device.type == "cuda" else None)
        self.reduced = {"calls": 0, "tensors": 0, "numel": 0}
        self._trainable: list[nn.Parameter] = []

    def tag(self, message: str) -> str:
        return f"rank {self.rank}/{self.world_size}: {message}"

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward through: DDP around `model`, or `model` itself
        sharded in place by FSDP2. `model` keeps its parameters' names and adapters."""
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        if self.parallel == "fsdp2":
            wrapped = self._fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ignore = [n for n,
                      p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            wrapped.register_comm_hook(self, _counting_allreduce_hook)
        self.frozen_bytes_here = _frozen_bytes_here(model)
        return wrapped

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        ignored = set(self._trainable)
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return model

    def no_sync(self, model: nn.Module):
        """Skip gradient synchronisation (every micro-batch but a step's last)."""
        return model.no_sync() if hasattr(model, "no_sync") and self.parallel == "ddp" else contextlib.nullcontext()

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """FSDP2: average the (ignored, replicated) trainable tensors' gradients over the ranks.
        DDP has done it in backward already."""
        if self.parallel != "fsdp2" or not params:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.div_(self.world_size)
        dist.all_reduce(flat)
        self.reduced["calls"] += 1
        self.reduced["tensors"] += len(params)
        self.reduced["numel"] += flat.numel()
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    # ------------------------------------------------------------------ collectives
    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over the ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (on every rank)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def stats(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self._trainable)
        return {"world_size": self.world_size, "backend": self.backend, "parallel": self.parallel,
                "gradient_allreduce": dict(self.reduced), "trainable_tensors": len(self._trainable),
                "trainable_numel": trainable,
                "frozen_bytes_on_rank0": getattr(self, "frozen_bytes_here", None)}

    def finish(self) -> None:
        """The normal end: wait for every rank (a rank that tears its process group down and exits
        while another still talks to it can make the other abort), then leave the group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        self.close()

    def close(self) -> None:
        """Leave the process group (also on an error path: no barrier)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _frozen_bytes_here(model: nn.Module) -> int:
    """Bytes of the frozen parameters this process holds (its local shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total


def _counting_allreduce_hook(state: Distributed, bucket):  # no annotations: DDP checks them as objects
    """DDP comm hook: the default all-reduce (average; returns its `Future[Tensor]`), counting
    buckets, tensors and elements."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.reduced["calls"] += 1
    state.reduced["tensors"] += len(bucket.gradients())
    state.reduced["numel"] += bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the children of the outermost `nn.ModuleList`s
    holding parameters (transformer layers: `model.layers`, `encoder.layer`, `transformer.h`)."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1 and any(True for _ in module.parameters()):
            blocks.extend(module)
            taken.append(name)
    return blocks


# ---------------------------------------------------------------------- launcher
def launch(nproc: int, argv: list[str], threads: int | None = None) -> int:
    """Run `python -m lorakit <argv>` in `nproc` processes on this node with torchrun
    (`torch.distributed.run --standalone`: a local rendezvous on a free port). Returns the exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(threads, nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit",
           *argv]
    return subprocess.call(cmd, env=env)
