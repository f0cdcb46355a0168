"""Bring up torch.distributed, Megatron-core's parallel groups and DeepSpeed comm.

`init_distributed(tp, pp)` works the same under every launcher a user has:

* `torchrun` and the `deepspeed` launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT;
* SLURM `srun` (one task per GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
  SLURM_JOB_NODELIST / SLURM_JOB_ID: the master is the first host of the node list and the port
  is derived from the job id, so every task of a job agrees without talking;
* nothing at all: a one-process group on a free local port (notebooks, unit tests).

Group layout is Megatron-core's ("tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent, so a TP
group stays inside a node).  NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .compat import apply_cpu_compat
from .runlock import die_with_launcher


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    backend: str
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None


# ---------------------------------------------------------------------------------------------
# launcher environment
# ---------------------------------------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list like ``gpu[01-03,07],login1`` into host names.

    Uses ``scontrol show hostnames`` when it exists (it knows every SLURM syntax), else a
    parser for the common ``prefix[a-b,c]`` form.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        part = part.strip(",")
        m = re.fullmatch(r"(.*)\[(.*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def slurm_master_port(job_id: str | int) -> int:
    """A port every task of a job derives alike: 15000 + job_id mod 20000 (10000 ports of slack
    below the ephemeral range)."""
    return 15000 + int(job_id) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launch_env(environ: dict | None = None) -> tuple[str, dict]:
    """Work out rank/world/master from the launcher's variables.

    Returns (launcher name, env dict with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT).  torchrun/deepspeed variables win over SLURM's: with `srun torchrun`
    (one torchrun per node) SLURM_PROCID is the node index, not the process rank.
    """
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        return launcher, out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return "slurm", {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", nodes[0]),
            "MASTER_PORT": env.get("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID", "0")))),
        }
    return "single", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": env.get("MASTER_PORT", str(free_port()))}


# ---------------------------------------------------------------------------------------------
# bring-up
# ---------------------------------------------------------------------------------------------


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None,
                     timeout_minutes: int = 30) -> DistInfo:
    """Initialize torch.distributed + Megatron parallel_state + DeepSpeed comm (idempotent).

    Raises ValueError (before any collective) if world size is not divisible by tp*pp.
    """
    global _INFO
    if _INFO is not None:
        if (_INFO.tp_size, _INFO.pp_size) != (tp, pp):
            raise RuntimeError(f"distributed already initialized with tp={_INFO.tp_size} pp={_INFO.pp_size}; "
                               f"asked for tp={tp} pp={pp}")
        return _INFO

    apply_cpu_compat()

    die_with_launcher()  # d2v2-train does it first thing; bench and other entry points here
    launcher, env = resolve_launch_env()
    # DeepSpeed and Megatron read these names; export what we resolved (SLURM case).
    os.environ.update(env)
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}: launch a multiple of "
                         f"{tp * pp} processes or change parallel.tp / parallel.pp")

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launcher == "single":
            # One process with nobody to meet: an in-memory store, no TCP port.  A port picked by
            # free_port() and bound later by TCPStore can be taken in between (CI saw EADDRINUSE
            # in the quickstart's probe).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timeout)

    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=timeout_minutes,
                                     create_gloo_process_groups=False)

    import deepspeed

    # Wraps the existing default group (no second rendezvous).
    deepspeed.init_distributed(dist_backend=backend, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))

    _INFO = DistInfo(
        rank=rank, world_size=world, local_rank=local_rank,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        backend=backend, device=device, launcher=launcher,
    )
    return _INFO


def get_info() -> DistInfo:
    if _INFO is None:
        raise RuntimeError("call d2v2_scale.distributed.init_distributed() first")
    return _INFO


def destroy() -> None:
    global _INFO
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


class MegatronMPU:
    """Megatron-core parallel_state in the shape DeepSpeed's `mpu=` expects.

    DeepSpeed calls `get_model_parallel_*` (Megatron-LM's old names), which parallel_state no
    longer has.  "Model parallel" is Megatron's: tensor x pipeline parallel, the ranks DeepSpeed
    must neither partition nor average across.  Its rank names the checkpoint files
    (mp_rank_XX = pp_rank * tp + tp_rank), and its group is where ZeRO sums the gradient norm, so
    the norm covers every stage; parameters replicated across TP ranks are counted on TP rank 0
    (DeepSpeed asks `get_tensor_model_parallel_rank` for that).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return dist.get_rank(group=self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(group=self.ps.get_model_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()
