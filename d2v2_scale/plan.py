"""d2v2-plan: predict per-GPU memory and per-step communication of a run of any
preset (data2vec 2.0, data2vec 1.0 d2v1-*, data2vec-aqc aqc-*).

    d2v2-plan --preset image-large --nodes 2 --gpus-per-node 8 --zero 3 [--tp 1] [--batch 8]
              [--gpu-mem-gb 80] [--nvlink-gbps 450] [--inter-gbps 50] [--mfu 0.45] [--act-ckpt both]

Everything here is a PREDICTION from the config (no GPU, no process group beyond one local
process used to build the model on the meta device for its exact parameter list):

memory per GPU
  * student model states: DeepSpeed's own estimators (deepspeed 0.19.8
    `stage3.estimate_zero3_model_states_mem_needs` / `stage_1_and_2.estimate_zero2_model_states_mem_needs`,
    the functions behind the `*_all_cold` printers; no offload, zero_init) with the student's
    parameters per tensor-parallel rank spread over the data-parallel ranks.  ZeRO-0/1 use the
    ZeRO-2 estimator with the replicated parts put back (0: 16 bytes/param replicated + 2; 1: + 2
    bytes of full bf16 gradients).
  * teacher: its ZeRO-3 partition (params only, 2 bytes/param/dp; replicated under ZeRO 0-2)
    + the fp32 EMA master (4 bytes/param/dp under ZeRO-3, full under 0-2).
  * activations (analytic, bf16): a transformer block keeps about 34*D bytes per token without an
    attention matrix (fused/flash SDPA; Korthikanti et al. 2022, dropout masks included) divided
    by TP for the parallel parts; the student keeps that for B*M rows of (T_keep + E) tokens in
    every block; with activation checkpointing only the block input (2*D bytes/token/block) plus
    one block being recomputed.  The teacher keeps nothing for backward: one block's working set
    on B full sequences plus its K target layers.  The decoder: ~ (4 tensors x layer) per
    position of B*M rows x T.  Fragmentation and workspace are not modelled (`--overhead`).

communication per step (logical bytes per rank; time = ring traffic (n-1)/n x bytes / bandwidth,
the inter-node link when the group spans nodes, NVLink otherwise)
  * ZeRO-3: student parameters all-gathered for forward and again for backward where DeepSpeed
    releases them (a parameter is kept between its forward and backward use when fewer than
    `stage3_max_reuse_distance` (1e9) parameter elements are fetched in between, so models
    below ~5e8 parameters gather once); parameters with <= `stage3_param_persistence_threshold`
    (1e5) elements are persistent: one all-gather per step after the optimizer step.  The
    teacher (persistence 0) is gathered once (its forward).  Gradients: one reduce-scatter of
    every student parameter.
  * ZeRO-1/2: gradient reduce-scatter (2) / all-reduce (1, 0) of every parameter, and under
    ZeRO-1/2 an all-gather of the updated bf16 parameters.
  * TP > 1: two all-reduces per block forward and two per block backward of the student's
    activations [B*M, T_keep+E, D], two per block of the teacher's [B, T+E, D].
  * a few scalar all-reduces (finiteness checks, grad norm, logged means): < 1 KB.
  * PP > 1 (ZeRO-1 only, as in training): per update and stage boundary, M micro-batches each
    send the teacher's message [E + 2T, B, D] fp32 forward, the student's [E + T_keep, B*M, D]
    forward and its gradient backward (train/pipeline.py); point-to-point, on the critical path
    unless overlapped by the schedule.
compute = analytic FLOPs (`d2v2_scale/model/flops.py`) / (tp x pp) / (peak x --mfu); under PP per
update of M micro-batches, times the 1F1B bubble (M + pp - 1) / M.  ZeRO traffic can overlap compute (prefetch, bucketed
reduce); TP all-reduces sit on the critical path.

With PP the memory is that of the fullest stage: stage 0 holds the front end and keeps the
activations of min(pp, M) micro-batches in flight (1F1B), the last stage holds the decoder and the
M micro-batches' teacher targets [B, T, D] fp32 between the two passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field

from .config import build_config

# The model (Megatron-core, DeepSpeed) is imported inside the functions that measure it: `d2v2-plan
# --help` and a bad preset answer without that multi-second import.

GB = 1e9
GIB = 2**30


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


@dataclass
class ParamInfo:
    name: str
    numel: int  # per tensor-parallel rank
    block: int | None  # encoder block index, None for the rest


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if "blocks" in parts:
        i = parts.index("blocks")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def param_tables(cfg, tp: int = 1) -> tuple[list[ParamInfo], list[ParamInfo]]:
    """(student, teacher) parameter lists, numel per TP rank; built on the meta device."""
    import torch
    import torch.distributed as dist

    from .distributed import init_distributed
    from .model import build_student, build_teacher

    if not dist.is_initialized():
        init_distributed(1, 1)

    c = copy.deepcopy(cfg)
    c.parallel.tp = 1
    with torch.device("meta"):
        s, t = build_student(c), build_teacher(c)  # either objective (model.variant)

    def table(mod):
        out = []
        for n, p in mod.named_parameters():
            k = p.numel()
            if getattr(p, "tensor_model_parallel", False):
                k //= tp
            elif n.endswith("alibi_scale"):
                k //= tp
            out.append(ParamInfo(n, int(k), _block_of(n)))
        return out

    return table(s), table(t)


def stage_table(params: list[ParamInfo], total_blocks: int, pp: int, rank: int) -> list[ParamInfo]:
    """The parameters pipeline stage `rank` holds (train/pipeline.py's split)."""
    from .train.pipeline import on_stage

    return [p for p in params if on_stage(p.name, p.block, total_blocks, pp, rank)]


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    nvlink_gbps: float = 450.0  # GB/s per GPU, one direction (H100 SXM NVLink 4)
    inter_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s IB/RoCE per GPU)
    peak_tflops: float = 989.0
    mfu: float = 0.45


@dataclass
class Plan:
    preset: str
    zero: int
    tp: int
    dp: int
    world: int
    batch: int
    act_ckpt: str
    dtype_bytes: int
    student_params: int  # per TP rank (and per stage: the fullest one)
    teacher_params: int
    pp: int = 1
    microbatches: int = 1
    memory_gib: dict = field(default_factory=dict)
    comm_bytes: dict = field(default_factory=dict)  # per collective type, per rank per step
    comm_s: dict = field(default_factory=dict)
    compute_s: float = 0.0
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _pad(n: int, dp: int) -> int:
    return -(-n // dp) * dp


def predict_comm(cfg, student: list[ParamInfo], teacher: list[ParamInfo], dp: int, tp: int, zero: int,
                 dtype_bytes: int, persistence_threshold: int = 100_000,
                 max_reuse_distance: int = 1_000_000_000, grad_bytes: int | None = None) -> dict:
    """Logical bytes per rank per optimizer step (one micro-batch), by collective type."""
    from .model.flops import seq_len_and_keep
    from .model.modalities import get_modality

    gb = grad_bytes or dtype_bytes
    m = cfg.model
    out = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "all_reduce_tp": 0}
    detail = {}
    if dp > 1:
        if zero == 3:
            persist = [p for p in student if p.numel <= persistence_threshold]
            gathered = [p for p in student if p.numel > persistence_threshold]
            per_block: dict[int, int] = {}
            for p in gathered:
                if p.block is not None:
                    per_block[p.block] = per_block.get(p.block, 0) + p.numel
            n_blocks = m.total_blocks
            rest = sum(p.numel for p in gathered if p.block is None)
            fwd = sum(_pad(p.numel, dp) for p in gathered)
            # backward re-gathers: block i is released after forward if more than max_reuse_distance
            # elements are fetched before its backward use (the later blocks twice, the decoder, ...)
            bwd = 0
            for i in range(n_blocks):
                between = 2 * sum(per_block.get(j, 0) for j in range(i + 1, n_blocks)) + 2 * rest
                if between >= max_reuse_distance:
                    bwd += _pad(per_block.get(i, 0), dp)
            detail["student_fwd_gather"] = fwd * dtype_bytes
            detail["student_bwd_regather"] = bwd * dtype_bytes
            detail["student_persistent_gather"] = sum(_pad(p.numel, dp) for p in persist) * dtype_bytes
            detail["teacher_gather"] = sum(_pad(p.numel, dp) for p in teacher) * dtype_bytes
            out["all_gather"] = sum(detail.values())
            detail["grad_reduce_scatter"] = sum(_pad(p.numel, dp) for p in student) * gb
            out["reduce_scatter"] = detail["grad_reduce_scatter"]
        else:
            n = sum(p.numel for p in student)
            if zero == 2:
                out["reduce_scatter"] = detail["grad_reduce_scatter"] = n * gb
            else:
                out["all_reduce"] = detail["grad_all_reduce"] = n * gb
            if zero in (1, 2):
                out["all_gather"] = detail["param_all_gather"] = n * dtype_bytes
    if tp > 1:
        b, mm = cfg.data.batch_size, m.clone_batch
        t, keep = seq_len_and_keep(cfg)
        e = get_modality(m).num_extra_tokens
        s_act = b * mm * (keep + e) * m.embed_dim * dtype_bytes
        t_act = b * (t + e) * m.embed_dim * dtype_bytes
        nb = len({p.block for p in student if p.block is not None})  # this stage's blocks (all without PP)
        detail["tp_student"] = 4 * nb * s_act
        detail["tp_teacher"] = 2 * nb * t_act
        out["all_reduce_tp"] = detail["tp_student"] + detail["tp_teacher"]
    out["detail"] = detail
    return out


def activation_bytes(cfg, tp: int, ckpt: bool, dtype_bytes: int = 2, pp: int = 1, microbatches: int = 1,
                     stage: int = 0) -> dict:
    """Activation bytes of one pipeline stage (the whole model when pp == 1)."""
    from .model.flops import seq_len_and_keep
    from .model.modalities import get_modality

    m = cfg.model
    b, mm = cfg.data.batch_size, m.clone_batch
    t, keep = seq_len_and_keep(cfg)
    e = get_modality(m).num_extra_tokens
    d, nb = m.embed_dim, m.total_blocks // pp
    first, last = stage == 0, stage == pp - 1
    in_flight = min(pp - stage, microbatches) if pp > 1 else 1  # 1F1B: stage s holds pp - s
    scale = dtype_bytes / 2
    s_tok = b * mm * (keep + e)
    per_block_full = s_tok * (10 + 24 / tp) * d * scale  # 34*D at tp=1: LN/residual parts unsplit
    if ckpt:
        student = in_flight * nb * s_tok * 2 * d * scale + per_block_full
    else:
        student = in_flight * nb * per_block_full
    t_tok = b * (t + e)
    teacher = t_tok * (10 + 24 / tp) * d * scale + m.top_k_layers * t_tok * d * dtype_bytes + t_tok * d * 4
    if pp > 1 and last:  # the targets of all M micro-batches wait for the student pass
        teacher += microbatches * b * t * d * 4
    # + the two-layer head's hidden (before and after GELU) for text (docs/REFERENCE.md §1.10 D1)
    head = 2 * int(m.decoder_dim * m.decoder_projection_ratio) if m.decoder_projection_layers == 2 else 0
    decoder = b * mm * t * (m.decoder_layers * 4 * m.decoder_dim + 2 * d + head) * dtype_bytes if last else 0
    front = in_flight * b * mm * t * d * dtype_bytes * 2 if first else 0  # repeated features + filled sequence
    return {"student": student, "teacher": teacher, "decoder": decoder, "front": front,
            "total": student + teacher + decoder + front}


def p2p_bytes(cfg, tp: int, microbatches: int, dtype_bytes: int = 2) -> dict:
    """Bytes one rank at a stage boundary sends + receives per update (PP > 1)."""
    from .model.flops import seq_len_and_keep
    from .model.modalities import get_modality

    m = cfg.model
    b, mm = cfg.data.batch_size, m.clone_batch
    t, keep = seq_len_and_keep(cfg)
    e = get_modality(m).num_extra_tokens
    teacher = (e + 2 * t) * b * m.embed_dim * 4
    student = (e + keep) * b * mm * m.embed_dim * dtype_bytes
    return {"teacher_fwd": microbatches * teacher, "student_fwd": microbatches * student,
            "student_bwd": microbatches * student, "total": microbatches * (teacher + 2 * student)}


def model_state_bytes(student_n: int, teacher_n: int, largest: int, dp: int, zero: int,
                      dtype_bytes: int = 2) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 3:
        _, s_gpu, _ = estimate_zero3_model_states_mem_needs(student_n, largest, num_gpus_per_node=dp, num_nodes=1,
                                                            cpu_offload=False, cpu_offload_params=False,
                                                            zero_init=True)
        teacher = teacher_n * dtype_bytes / dp + 4 * largest  # partition + one gathered layer
        ema = 4 * teacher_n / dp
    else:
        _, s_gpu = estimate_zero2_model_states_mem_needs(student_n, num_gpus_per_node=dp, num_nodes=1,
                                                         cpu_offload=False)
        if zero == 1:
            s_gpu += 2 * student_n  # full bf16 gradients (not partitioned)
        elif zero == 0:
            s_gpu = 2 * student_n + 18 * student_n
        teacher = teacher_n * dtype_bytes
        ema = 4 * teacher_n
    return {"student_states": float(s_gpu), "teacher_params": float(teacher), "ema_master": float(ema)}


def _coll_time(nbytes: float, n: int, spans_nodes: bool, hw: Hardware, factor: float = 1.0) -> float:
    if n <= 1 or nbytes == 0:
        return 0.0
    bw = (hw.inter_gbps if spans_nodes else hw.nvlink_gbps) * GB
    return factor * nbytes * (n - 1) / n / bw


def make_plan(preset: str, hw: Hardware, zero: int = 3, tp: int = 1, batch: int | None = None,
              act_ckpt: bool = False, overrides: list[str] | None = None, dtype_bytes: int = 2,
              overhead_gib: float = 2.0, tables=None, pp: int = 1, microbatches: int | None = None) -> Plan:
    from .model.flops import step_flops

    cfg = build_config(preset, overrides=list(overrides or []))
    if batch:
        cfg.data.batch_size = batch
    world = hw.nodes * hw.gpus_per_node
    if world % (tp * pp):
        raise ValueError(f"world {world} not divisible by tp x pp = {tp} x {pp}")
    if pp > 1 and zero != 1:
        raise ValueError(f"pp={pp} needs ZeRO-1 (as in training), not ZeRO-{zero}")
    if cfg.model.total_blocks % pp:
        raise ValueError(f"{cfg.model.total_blocks} blocks do not split into pp={pp} stages")
    mb = microbatches or max(cfg.optim.grad_accum, pp)
    dp = world // (tp * pp)
    student, teacher = tables or param_tables(cfg, tp)
    stage = 0
    if pp > 1:  # plan for the fullest stage (the first holds the front end, the last the decoder)
        sizes = [sum(p.numel for p in stage_table(student, cfg.model.total_blocks, pp, r)) for r in range(pp)]
        acts = [activation_bytes(cfg, tp, act_ckpt, dtype_bytes, pp, mb, r)["total"] for r in range(pp)]
        stage = max(range(pp), key=lambda r: 20 * sizes[r] / dp + acts[r])
        student = stage_table(student, cfg.model.total_blocks, pp, stage)
        teacher = stage_table(teacher, cfg.model.total_blocks, pp, stage)
    sn, tn = sum(p.numel for p in student), sum(p.numel for p in teacher)
    blocks: dict = {}
    for p in student:
        key = p.block if p.block is not None else p.name.rsplit(".", 1)[0]
        blocks[key] = blocks.get(key, 0) + p.numel
    largest = max(blocks.values())
    plan = Plan(preset=preset, zero=zero, tp=tp, dp=dp, world=world, batch=cfg.data.batch_size,
                act_ckpt="full" if act_ckpt else "none", dtype_bytes=dtype_bytes, student_params=sn,
                teacher_params=tn, pp=pp, microbatches=mb)
    ms = model_state_bytes(sn, tn, largest, dp, zero, dtype_bytes)
    act = activation_bytes(cfg, tp, act_ckpt, dtype_bytes, pp, mb, stage)
    mem = {**ms, **{f"act_{k}": v for k, v in act.items() if k != "total"}}
    mem["overhead"] = overhead_gib * GIB
    mem["total"] = sum(mem.values())
    plan.memory_gib = {k: v / GIB for k, v in mem.items()}
    plan.memory_gib["fits"] = mem["total"] <= hw.gpu_mem_gb * GB
    comm = predict_comm(cfg, student, teacher, dp, tp, zero, dtype_bytes)
    plan.comm_bytes = comm
    dp_spans = dp > hw.gpus_per_node // tp
    if pp > 1:
        comm["p2p"] = p2p_bytes(cfg, tp, mb, dtype_bytes)
        # Megatron's rank order puts pipeline neighbours tp x dp ranks apart
        pp_spans = tp * dp >= hw.gpus_per_node
    plan.comm_s = {
        "all_gather": _coll_time(comm["all_gather"], dp, dp_spans, hw),
        "reduce_scatter": _coll_time(comm["reduce_scatter"], dp, dp_spans, hw),
        "all_reduce": _coll_time(comm["all_reduce"], dp, dp_spans, hw, 2.0),
        "all_reduce_tp": _coll_time(comm["all_reduce_tp"], tp, False, hw, 2.0),
        # point-to-point: no ring, the whole message crosses the link (send and receive overlap)
        "p2p": (comm["p2p"]["total"] / 2 / ((hw.inter_gbps if pp_spans else hw.nvlink_gbps) * GB)) if pp > 1 else 0.0,
    }
    sf = step_flops(cfg)
    flops = sf["total"] + (sf["student"] / 3 if act_ckpt else 0.0)  # recompute: one more student forward
    plan.compute_s = flops / (tp * pp) / (hw.peak_tflops * 1e12 * hw.mfu)
    if pp > 1:  # one update = M micro-batches through the pipeline, plus the fill/drain bubble
        bubble = (mb + pp - 1) / mb
        plan.compute_s *= mb * bubble
        plan.notes.append(f"PP={pp}, {mb} micro-batches: planned stage {stage}; 1F1B bubble x{bubble:.2f} in "
                          f"compute; p2p {comm['p2p']['total'] / GB:.2f} GB/update ({plan.comm_s['p2p']:.3f} s "
                          f"unless overlapped)")
    zero_s = plan.comm_s["all_gather"] + plan.comm_s["reduce_scatter"] + plan.comm_s["all_reduce"]
    plan.notes.append(f"ZeRO traffic {zero_s:.3f} s vs compute {plan.compute_s:.3f} s: "
                      + ("hidden by compute (if overlapped)" if zero_s <= plan.compute_s else
                         f"NOT hidden: exposes >= {zero_s - plan.compute_s:.3f} s/step"))
    if tp > 1:
        plan.notes.append(f"TP all-reduces add {plan.comm_s['all_reduce_tp']:.3f} s (critical path)")
    return plan


def format_plans(plans: list[Plan], hw: Hardware) -> str:
    lines = [f"d2v2-plan (PREDICTION)  {hw.nodes} node(s) x {hw.gpus_per_node} GPU  {hw.gpu_mem_gb:g} GB/GPU  "
             f"NVLink {hw.nvlink_gbps:g} GB/s  inter-node {hw.inter_gbps:g} GB/s/GPU  "
             f"compute at MFU {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s",
             "",
             "| preset | ZeRO | TP | PP | DP | B/GPU | act ckpt | student params/TP rank | model states GiB | teacher+EMA GiB "
             "| activations GiB | total GiB | fits | all-gather GB | reduce-scatter GB | all-reduce GB | TP all-reduce GB "
             "| comm s (ZeRO) | comm s (TP) | compute s | hidden |",
             "|" + "---|" * 21]
    for p in plans:
        mg = p.memory_gib
        act = sum(v for k, v in mg.items() if k.startswith("act_"))
        cb, cs = p.comm_bytes, p.comm_s
        zero_s = cs["all_gather"] + cs["reduce_scatter"] + cs["all_reduce"]
        lines.append(
            f"| {p.preset} | {p.zero} | {p.tp} | {p.pp} | {p.dp} | {p.batch} | {p.act_ckpt} | {p.student_params / 1e6:.1f}M "
            f"| {mg['student_states']:.2f} | {mg['teacher_params'] + mg['ema_master']:.2f} | {act:.1f} "
            f"| {mg['total']:.1f} | {'yes' if mg['fits'] else 'NO'} | {cb['all_gather'] / GB:.2f} "
            f"| {cb['reduce_scatter'] / GB:.2f} | {cb['all_reduce'] / GB:.2f} | {cb['all_reduce_tp'] / GB:.2f} "
            f"| {zero_s:.3f} | {cs['all_reduce_tp']:.3f} | {p.compute_s:.3f} "
            f"| {'yes' if zero_s <= p.compute_s else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(prog="d2v2-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, nargs="+")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (needs --zero 1)")
    ap.add_argument("--microbatches", type=int, default=None,
                    help="micro-batches per update under PP (default: optim.grad_accum, at least pp)")
    ap.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="per-GPU micro-batch(es) (default: preset)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--nvlink-gbps", type=float, default=450.0)
    ap.add_argument("--inter-gbps", type=float, default=50.0, help="inter-node GB/s per GPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.45)
    ap.add_argument("--act-ckpt", choices=("none", "full", "both"), default="both")
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 = bf16, 4 = fp32")
    ap.add_argument("--overhead-gib", type=float, default=2.0, help="CUDA context, workspace, fragmentation")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.pp > 1 and a.zero != 1:
        ap.error(f"--pp {a.pp} needs --zero 1 (pipeline parallelism trains with ZeRO-1 only)")
    hw = Hardware(a.nodes, a.gpus_per_node, a.gpu_mem_gb, a.nvlink_gbps, a.inter_gbps, a.peak_tflops, a.mfu)
    ckpts = {"none": [False], "full": [True], "both": [False, True]}[a.act_ckpt]
    plans = []

    for preset in a.preset:
        tables = param_tables(build_config(preset, overrides=a.overrides), a.tp)
        for b in (a.batch or [None]):
            for ck in ckpts:
                plans.append(make_plan(preset, hw, a.zero, a.tp, b, ck, a.overrides, a.dtype_bytes,
                                       a.overhead_gib, tables=tables, pp=a.pp, microbatches=a.microbatches))
    print(format_plans(plans, hw))
    for p in plans:
        for n in p.notes:
            print(f"  {p.preset} B={p.batch} ckpt={p.act_ckpt}: {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([p.to_dict() for p in plans], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
