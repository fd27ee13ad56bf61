"""The process a run lives in: its device, its place among torchrun's processes (and what
says one of them is gone), the signals that stop it, and the glibc setting that keeps it fast."""
from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from densenet_trainer.config.cli import UserError


def capture_cuda_graph(step: Callable[[], None], pool: tuple | None = None) -> Callable[[], None]:
    """Record one call of ``step`` as a CUDA graph (nothing runs), its memory in ``pool``
    (None: a pool of its own); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph.replay


@dataclass
class Runtime:
    """The process: its device, its rank among ``world_size`` processes, and ``capture``, how
    it records a training step as a graph to replay (None: it runs every step eagerly)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None
    jobs: dict = field(default_factory=dict)  # the launchers' jobs, agreed by every process (launcher_jobs)
    unused_gpu: str | None = None  # --device auto: why a GPU the machine has was not used
    label: str = ""  # with several runs in the process (train.py --seeds): the run its lines are of

    @classmethod
    def alone(cls, device: torch.device) -> Runtime:
        """One process on ``device``; on CUDA it captures steps as CUDA graphs."""
        return cls(device, capture=capture_cuda_graph if device.type == "cuda" else None,
                   jobs=launcher_jobs([local_jobs()]))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, *args, **kwargs) -> None:
        """print, on the main process only (under torchrun every process runs the same code),
        after the run's label where there is one."""
        if self.main:
            print(*((f"[{self.label}]",) if self.label else ()), *args, **kwargs)


def setup_runtime(device_flag: str) -> Runtime:
    """One process, or DistributedDataParallel when started by torchrun (NCCL or Gloo).

    On CUDA, cuDNN benchmarks its convolution algorithms once per shape: every training and
    evaluation batch has one shape, so that happens in the first steps only.
    """
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: {unusable_gpu() or 'no CUDA GPU is visible'}; use --device cpu")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    torch.backends.cudnn.benchmark = use_cuda
    runtime = _process_runtime(use_cuda)
    if device_flag == "auto" and not use_cuda:
        runtime.unused_gpu = unusable_gpu()
        if runtime.unused_gpu:
            remedy = (f"an NVIDIA driver for CUDA {torch.version.cuda} or newer" if torch.version.cuda
                      else "torch's CUDA build (README: Set up)")
            runtime.log(f"warning: {runtime.unused_gpu}; training on the CPU instead, perhaps a "
                        f"hundred times slower. Install {remedy}, or pass --device cpu to mean it")
    return runtime


def _process_runtime(use_cuda: bool) -> Runtime:
    """setup_runtime's process: alone, or one of torchrun's."""
    if "LOCAL_RANK" not in os.environ:
        return Runtime.alone(torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_jobs())
    # several processes step eagerly: DistributedDataParallel's all-reduce is not captured
    return Runtime(device, dist.get_rank(), dist.get_world_size(), jobs=launcher_jobs(gathered))


def unusable_gpu() -> str | None:
    """Why an NVIDIA GPU this machine has is not usable by torch (None: it is, or the
    driver lists none): the GPU as the driver lists it, and torch's reason."""
    if torch.cuda.is_available():
        return None
    listed = gpus_listed()
    if not listed:
        return None
    if torch.version.cuda is None:
        reason = "it is built without CUDA"
    else:
        try:
            torch.cuda.init()
            reason = "it finds no CUDA device"
        except Exception as error:  # the driver too old, or none loaded: torch says which
            reason = (str(error).strip().split(". ")[0].splitlines() or [type(error).__name__])[0]
    return f"this machine has a GPU ({listed}) that torch {torch.__version__} cannot use: {reason}"


def gpus_listed() -> str | None:
    """The first GPU the NVIDIA driver lists (``nvidia-smi -L``), or None."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = listing.strip().splitlines()[0] if listing.strip() else ""
    return first.split(" (UUID")[0] or None


ATTEMPT_STORE = "densenet/attempt-store"  # the agent's store key naming this attempt's own store


def init_process_group(backend: str) -> None:
    """torchrun's process group. Where the workers share the agent's store
    (TORCHELASTIC_USE_AGENT_STORE), that store outlives a restart, and a restarted group
    that read the previous attempt's addresses there connected to processes that were gone
    (measured with gloo: refused connections, or a wait for the store's 30-minute timeout);
    nor can a prefix per restart count tell attempts apart: on several nodes each agent
    counts its own restarts. So the group meets in a store of this attempt's own, hosted by
    rank 0 on a free port, which the others find through the agent's store (attempt_store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False)
    dist.init_process_group(backend, store=attempt_store(agent, rank, world_size), rank=rank,
                            world_size=world_size)


def attempt_store(agent: dist.Store, rank: int, world_size: int, wait_s: float = 600) -> dist.Store:
    """A store of this attempt's own. Rank 0 hosts it on a free port and names it, with a
    fresh token, under ATTEMPT_STORE in the ``agent``'s store; the others read that name,
    which may still be the previous attempt's, and take the store only once it answers with
    the token named beside it (a previous attempt's store is gone, its port refuses or
    answers another token), trying again until ``wait_s`` has passed."""
    if rank == 0:
        own = dist.TCPStore(socket.getfqdn(), 0, world_size, is_master=True, wait_for_workers=False)
        token = uuid.uuid4().hex
        own.set("token", token)
        agent.set(ATTEMPT_STORE, f"{socket.getfqdn()} {own.port} {token}")
        return own
    deadline = time.monotonic() + wait_s
    while True:
        host, port, token = agent.get(ATTEMPT_STORE).decode().split(" ")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()  # a port that refuses is
            # a previous attempt's, found quietly: torch's own client logs each refusal, with a trace
            own = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timedelta(seconds=5))
            if own.get("token").decode() == token:
                return own
        except (RuntimeError, ValueError, OSError):  # gone, or not a store any more
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank} found no store of this attempt's rank 0 in {wait_s:.0f} s")
        time.sleep(0.2)


# The launchers that rerun a job after a failure, and where each says which job and which
# restart this is: torchrun's elastic agent (--max-restarts; the rendezvous's run id) and
# SLURM (a requeued job keeps its id; its restart count goes up).
LAUNCHERS = {"torchrun": ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
             "slurm": ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")}


def local_jobs() -> dict[str, dict]:
    """The launchers' jobs this process runs in, as its environment says, by launcher:
    ``{"id": ..., "restart": n}`` (n above zero: the launcher reran the job); torchrun's with
    its ``agent`` on this machine (agent_identity)."""
    jobs = {}
    for launcher, (job_variable, restart_variable) in LAUNCHERS.items():
        job = os.environ.get(job_variable, "")
        if job and job != "none":  # torchrun's static rendezvous has no run id of its own
            restart = os.environ.get(restart_variable, "0")
            jobs[launcher] = {"id": job, "restart": int(restart) if restart.isdigit() else 0}
    if "torchrun" in jobs:
        jobs["torchrun"]["agents"] = [agent_identity()]
    return jobs


def agent_identity() -> str:
    """The process that started this one (torchrun's agent): its machine, pid and start time,
    the same through every restart it makes and different for another launch, though that
    reuse the rendezvous id."""
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{platform.node()}:{parent}:{started}"


def launcher_jobs(each: list[dict[str, dict]]) -> dict[str, dict]:
    """The jobs of a group of processes from ``each`` one's local_jobs: one id per launcher,
    the highest restart count (on several nodes each torchrun agent counts its own
    restarts) and every agent; for config.json and to know a restart."""
    jobs: dict[str, dict] = {}
    for local in each:
        for launcher, job in local.items():
            merged = jobs.setdefault(launcher, {**job, "restart": 0})
            merged["restart"] = max(merged["restart"], job["restart"])
            if "agents" in job:
                merged["agents"] = sorted(set(merged.get("agents", [])) | set(job["agents"]))
    return jobs


def on_main(runtime: Runtime, action: Callable, *args):
    """``action(*args)`` on rank 0 alone; a UserError there ends every process, all at this point."""
    error, result = None, None
    if runtime.main:
        try:
            result = action(*args)
        except UserError as raised:
            error = raised
    if runtime.world_size > 1:
        message = [str(error) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not runtime.main:
            raise UserError(message[0])
    if error is not None:
        raise error
    return result


def broadcast(value, runtime: Runtime):
    """Rank 0's ``value``, on every process."""
    if runtime.world_size == 1:
        return value
    message = [value]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def lost_peer(error: BaseException) -> str | None:
    """Under torchrun, what says that ``error`` is a collective failing because another
    process of the job is gone (a killed worker, a lost node), in one line; else None."""
    said = (str(error).strip().splitlines() or [""])[0]
    if "LOCAL_RANK" in os.environ and (isinstance(error, dist.DistError) or any(s in said for s in LOST_PEER)):
        return f"another process of this torchrun job is gone ({said.split('] ', 1)[-1][:160]})"
    return None


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    """``values`` summed over the processes (themselves with one process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


# Signals that stop a run at its next step, saved: Ctrl-C, kill and schedulers' SIGTERM, a
# closed terminal or ssh session (SIGHUP), SLURM's warning before a time limit (SIGUSR1).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


class StopFlag:
    """Turns each of STOP_SIGNALS into a request to stop at the next safe point; a second
    signal REPEAT_S or more after the first kills. Signals within REPEAT_S of the first are
    the same request: a scheduler's SIGTERM (or a terminal's Ctrl-C) reaches torchrun and its
    workers at once, and torchrun hands its own on to them."""

    REPEAT_S = 2.0

    def __init__(self) -> None:
        self.signum = self.agreed = 0
        self.first = 0.0
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:
        if self.signum and time.monotonic() - self.first >= self.REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()

    def requested(self, runtime: Runtime) -> int:
        """The signal to stop for, agreed by every process (0: go on); kept in ``agreed``."""
        self.agreed = self.signum
        if runtime.world_size > 1:
            flag = torch.tensor([self.signum], device=runtime.device)
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            self.agreed = int(flag.item())
        return self.agreed


# ---------------------------------------------------------------- memory

def keep_freed_memory_mapped() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the system.

    By default every tensor over 32 MB is mmap'd and unmapped again, and the heap is trimmed
    after frees, so each training step page-faults its activations in afresh (seconds of
    kernel time per step on the CPU; see bench/speed.py). Serving all sizes from the heap
    and never trimming it keeps that memory mapped between steps. Other C libraries: no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
