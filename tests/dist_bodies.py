"""Bodies for the bootstrap tests, run in N processes by d2v2_scale.testing.run_distributed."""

import torch
import torch.distributed as dist

from d2v2_scale.distributed import init_distributed
from d2v2_scale.testing import save_result


def groups_body(tp: str, pp: str = "1"):
    info = init_distributed(tp=int(tp), pp=int(pp))
    from megatron.core import parallel_state as ps
    import deepspeed.comm as ds_comm

    out = {"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank,
           "tp_rank": info.tp_rank, "tp_size": info.tp_size, "pp_rank": info.pp_rank,
           "pp_size": info.pp_size, "dp_rank": info.dp_rank, "dp_size": info.dp_size,
           "launcher": info.launcher, "ds_world": ds_comm.get_world_size()}
    # all-reduce each group: the sum of (global rank + 1) over the group's members
    for name, group in (("tp", ps.get_tensor_model_parallel_group()),
                        ("dp", ps.get_data_parallel_group()),
                        ("pp", ps.get_pipeline_model_parallel_group()),
                        ("world", None)):
        t = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(t, group=group)
        out[f"sum_{name}"] = t.item()
        out[f"members_{name}"] = dist.get_process_group_ranks(group) if group is not None else list(
            range(info.world_size))
    # DeepSpeed's comm is live on the same group
    t = torch.ones(1)
    ds_comm.all_reduce(t)
    out["ds_sum"] = t.item()
    save_result(out)
