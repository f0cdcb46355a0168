"""Bootstrap: real multi-process torch.distributed + Megatron parallel_state + DeepSpeed comm."""

import pytest

from d2v2_scale.distributed import expand_nodelist, resolve_launch_env, slurm_master_port
from d2v2_scale.testing import DistributedTestError, run_distributed


def _check_layout(res, world, tp, pp=1):
    assert sorted(res) == list(range(world))
    dp = world // (tp * pp)
    for r, o in res.items():
        assert o["rank"] == r and o["world"] == world and o["ds_world"] == world
        assert (o["tp_size"], o["pp_size"], o["dp_size"]) == (tp, pp, dp)
        # Megatron order tp-cp-ep-dp-pp: TP ranks are adjacent
        assert o["tp_rank"] == r % tp
        assert o["dp_rank"] == (r // tp) % dp
        assert o["members_tp"] == [r - r % tp + i for i in range(tp)]
        assert o["members_dp"] == [r % tp + tp * i + (r // (tp * dp)) * tp * dp for i in range(dp)]
        # the all-reduce in each group summed exactly its members' (rank + 1)
        for g in ("tp", "dp", "pp", "world"):
            assert o[f"sum_{g}"] == sum(m + 1 for m in o[f"members_{g}"]), g
        assert o["ds_sum"] == world


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_tp2_two_processes(launcher):
    res = run_distributed("tests.dist_bodies:groups_body", nproc=2, args=["2"], launcher=launcher, timeout=120)
    _check_layout(res, world=2, tp=2)
    assert all(o["launcher"] == ("slurm" if launcher == "slurm" else "torchrun") for o in res.values())


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_tp2_dp2_four_processes(launcher):
    res = run_distributed("tests.dist_bodies:groups_body", nproc=4, args=["2"], launcher=launcher,
                          nnodes_emulated=2, timeout=150)
    _check_layout(res, world=4, tp=2)
    if launcher == "slurm":
        assert [o["local_rank"] for o in res.values()] == [0, 1, 0, 1]


def test_world_not_divisible_fails_with_message():
    with pytest.raises(DistributedTestError, match="world size 2 is not divisible by tp x pp = 4"):
        run_distributed("tests.dist_bodies:groups_body", nproc=2, args=["4"], timeout=90)


def test_slurm_env_resolution():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08,10],cpu1"}
    launcher, out = resolve_launch_env(env)
    assert launcher == "slurm"
    assert out["RANK"] == "5" and out["WORLD_SIZE"] == "8" and out["LOCAL_RANK"] == "1"
    assert out["MASTER_ADDR"] == "gpu07"
    assert out["MASTER_PORT"] == str(slurm_master_port(123456)) == str(15000 + 123456 % 20000)
    # torchrun variables win over SLURM's (srun torchrun: SLURM_PROCID is the node index)
    launcher, out = resolve_launch_env(env | {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                              "MASTER_ADDR": "gpu08", "MASTER_PORT": "29400",
                                              "TORCHELASTIC_RUN_ID": "x"})
    assert launcher == "torchrun" and out["RANK"] == "3" and out["MASTER_ADDR"] == "gpu08"
    launcher, out = resolve_launch_env({})
    assert launcher == "single" and out["WORLD_SIZE"] == "1"


def test_expand_nodelist_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert expand_nodelist("gpu[07-08,10],cpu1") == ["gpu07", "gpu08", "gpu10", "cpu1"]
    assert expand_nodelist("node001") == ["node001"]
    assert expand_nodelist("a[1-3]") == ["a1", "a2", "a3"]
