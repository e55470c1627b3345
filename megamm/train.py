"""Train a LlavaModel with tensor, sequence and data parallelism.

One process per device, launched with torchrun:

    # 2 CPU processes, tensor parallel over both (examples/tiny_cpu.yaml trains in about a minute)
    torchrun --nproc-per-node 2 -m megamm.train --config examples/tiny_cpu.yaml \\
        --tensor-model-parallel-size 2 --sequence-parallel --mock-data

    # one node, 8 GPUs: tp=4 x dp=2, bf16, distributed optimizer
    torchrun --nproc-per-node 8 -m megamm.train --config cfg.yaml --tensor-model-parallel-size 4 \\
        --bf16 --use-distributed-optimizer --overlap-grad-reduce ...

`python -m megamm.train --help` lists every flag. Without torchrun the script runs as one process.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamm.checkpoint import format
from megamm.checkpoint.adapters import load_pretrained
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.model_weights import read_run_config_tree
from megamm.config import ConfigError
from megamm.config.parsing import read_run_config
from megamm.config.resolved import ResolvedConfig, resolve
from megamm.config.run import TrainingConfig
from megamm.data.balance import BatchPlan, interval_imbalance
from megamm.data.loader import ResumePoint
from megamm.models.lora import reset_magnitudes
from megamm.parallel.phase import RECORD
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.pipeline.schedules import bubble_fraction
from megamm.training.data import FileData, SyntheticData, build_training_data, rows_in, vision_inputs
from megamm.training.faults import install_from_environment
from megamm.training.metrics import peak_memory_gib, peak_tflops, step_flops
from megamm.training.preemption import EXIT_STOPPED, StopCheck, StopSignals
from megamm.training.preflight import file_problems
from megamm.training.scalar_writers import scalar_writers
from megamm.training.step import Trainer, build_trainer, evaluate, train_step
from megamm.training.stragglers import gather_step_times, spread_text
from megamm.training.watchdog import Watchdog


def _single_process_env() -> None:
    """Let `python -m megamm.train` run as a world of one without torchrun."""
    if "RANK" in os.environ:
        return
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def saved_run_config(load: str) -> dict | None:
    """The run config tree checkpoint `load` saved; None while `load` holds no checkpoint yet (a run
    that saves there starts from its initialization)."""
    if format.resolve(load) is None:
        return None
    return read_run_config_tree(load)[1]


def resume_dir(t: TrainingConfig) -> str | None:
    """Where the run resumes from: --load, else --save when it holds a checkpoint (so a requeued or
    restarted job resumes with its first command), else nothing (start from the initialization)."""
    if t.load:
        return t.load
    if t.save and format.resolve(t.save) is not None:
        return t.save
    return None


def read_config(argv: list[str] | None, world_size: int) -> ResolvedConfig:
    """Flags + YAML (+ the model of the checkpoint --load names) -> the resolved run, or ConfigError
    listing every problem: the config's and those of the files it names (megamm.training.preflight:
    data, tokenizer, checkpoint). Reads files only: no process group exists yet."""
    run, problems = read_run_config(argv, world_size, saved_config=saved_run_config)
    if run is not None:
        problems += file_problems(run)
    if problems:
        raise ConfigError(problems)
    return resolve(run, world_size)


@dataclass
class IntervalStats:
    """What accumulates between two log lines."""

    steps: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # data loading and steps, less the time blocked on other ranks
    flops: float = 0.0  # model FLOPs of this rank's share of the steps (its rows, images and videos)
    rows: int = 0
    grad_norms: list[float] = field(default_factory=list)
    plans: list[BatchPlan] = field(default_factory=list)  # --balance-vision-work assignments


class Reporter:
    """Prints log lines on one rank (and writes its scalars to TensorBoard / W&B when asked)."""

    def __init__(self, config: ResolvedConfig, state: ParallelState) -> None:
        self.enabled = state.tp_rank == 0 and state.cp_rank == 0 and state.dp_rank == 0 and state.is_last_stage
        self.interactive = self.enabled and sys.stdout.isatty()
        self.writers = scalar_writers(config) if self.enabled else []

    def line(self, text: str) -> None:
        if self.enabled:
            print(("\r" if self.interactive else "") + text, flush=True)

    def progress(self, iteration: int, total: int, loss: float) -> None:
        if self.interactive:
            done = int(30 * iteration / total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {iteration}/{total} loss {loss:.4f}", end="", flush=True)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        for writer in self.writers:
            writer.scalars(iteration, values)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _quiet(_: str) -> None:
    """The log of ranks whose data messages would repeat another rank's."""


def _data_counts(data: FileData | SyntheticData, state: ParallelState) -> tuple[str, dict[str, int]]:
    """Records read and skipped over all data-parallel ranks: the summary line's part and the counts."""
    counts = data.counts()
    if not counts:
        return "", {}
    names = sorted(counts)
    totals = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=state.device)
    dist.all_reduce(totals, group=state.dp_group)
    summed = dict(zip(names, (int(v) for v in totals.tolist())))
    reasons = ", ".join(f"{n.split('/', 1)[1]} {v}" for n, v in summed.items() if n.startswith("bad/") and v)
    return f"data: {summed['records']} records read, {summed['bad']} bad skipped ({reasons or 'none'}) | ", summed


def _sum_dp(value: float, state: ParallelState) -> float:
    tensor = torch.tensor(value, dtype=torch.float64, device=state.device)
    dist.all_reduce(tensor, group=state.dp_group)
    return tensor.item()


def _log(reporter: Reporter, trainer: Trainer, iteration: int, consumed: int, stats: IntervalStats, skipped: int,
         lr: float) -> None:
    config, state = trainer.config, trainer.state
    t = config.training
    world = state.world_size
    RECORD.enter("log-line reductions and step-time gather", waiting=True)
    busy = gather_step_times(stats.busy_seconds / max(stats.steps, 1), state)
    spread = spread_text(busy, t.straggler_threshold)
    # Rows, not samples: packed rows hold several samples each.
    rows = _sum_dp(stats.rows, state) / max(stats.steps, 1)
    # No timed step in the interval: only the compiling first step (--torch-compile) ran.
    seconds = stats.seconds / stats.steps if stats.steps else math.nan
    tokens_per_second = rows * t.seq_length / seconds
    flops = _sum_dp(stats.flops, state) / max(stats.steps, 1)
    tflops = flops / seconds / world / 1e12
    peak = peak_tflops(state.device, t.peak_tflops, half_precision=t.bf16 or t.fp16)
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    loss = stats.loss_sum / stats.loss_steps if stats.loss_steps else float("nan")
    norm = stats.grad_norms[-1] if stats.grad_norms else float("nan")
    reporter.line(
        f" iteration {iteration:8d}/{t.train_iters} | consumed samples: {consumed:10d} | "
        f"elapsed time per iteration (ms): {1000 * seconds:.1f} | learning rate: {lr:.3E} | "
        f"lm loss: {loss:.6E} | grad norm: {norm:.3f} | skipped iterations: {skipped} | "
        f"tokens/s: {tokens_per_second:.0f} | TFLOP/s/device: {tflops:.3f} | MFU: {mfu} | "
        f"peak memory (GiB): {peak_memory_gib(state.device):.2f}" + (f" | {spread}" if spread else "")
        + _balance_text(stats.plans)
    )
    reporter.scalars(iteration, {"lm-loss": loss, "learning-rate": lr, "grad-norm": norm,
                                 "tokens-per-second": tokens_per_second, "tflops-per-device": tflops,
                                 **_balance_scalars(stats.plans)})


def _balance_text(plans: list[BatchPlan]) -> str:
    """The log line's --balance-vision-work part: max / mean over dp ranks, and the contiguous split's."""
    if not plans:
        return ""
    balanced, contiguous = interval_imbalance(plans)
    return (f" | dp max/mean vision tokens: {balanced.vision:.3f} (contiguous {contiguous.vision:.3f}), "
            f"text tokens: {balanced.text:.3f} (contiguous {contiguous.text:.3f})")


def _balance_scalars(plans: list[BatchPlan]) -> dict[str, float]:
    if not plans:
        return {}
    balanced, contiguous = interval_imbalance(plans)
    return {"vision-imbalance": balanced.vision, "text-imbalance": balanced.text,
            "contiguous-vision-imbalance": contiguous.vision, "contiguous-text-imbalance": contiguous.text}


def run(config: ResolvedConfig) -> dict[str, float]:
    """Train as configured on the already launched processes; returns the final figures (`stopped`:
    why the run stopped before --train-iters, None when it finished)."""
    started = time.monotonic()
    t, p = config.training, config.parallel
    state = initialize_parallel_state(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.distributed_timeout_minutes,
        context_parallel_size=p.context_parallel_size,
    )
    rank = dist.get_rank()
    install_from_environment(RECORD, rank)
    limit = f"--distributed-timeout-minutes {p.distributed_timeout_minutes:g}"
    dump_dir = t.stack_dump_dir or t.save
    signals = StopSignals(rank)
    duration = 60.0 * t.exit_duration_in_mins if t.exit_duration_in_mins is not None else None
    stop = StopCheck(signals, duration, t.exit_interval, started)
    # The signal handlers first: the watchdog's SIGTERM stack dump chains to them.
    with signals, Watchdog(RECORD, 60.0 * p.distributed_timeout_minutes, rank, dump_dir, limit):
        return _train(config, state, stop)


def _train(config: ResolvedConfig, state: ParallelState, stop: StopCheck) -> dict[str, float]:
    """The run itself, on an initialized state, with the watchdog armed; `stop` decides after each
    step whether to stop early."""
    t = config.training
    RECORD.begin("setup", None, "building the model and optimizer")
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    reporter = Reporter(config, state)
    if config.lora is not None:
        # The base before the trainer: the optimizer's fp32 masters copy the weights it starts from.
        if t.pretrained_checkpoint:
            RECORD.enter(f"loading the base model {t.pretrained_checkpoint}")
            load_pretrained(chunks, t.pretrained_checkpoint, state, t.verify_checkpoint, reporter.line)
        reset_magnitudes(chunks)
    trainer = build_trainer(config, state, chunks)

    def run_eval(iteration: int) -> float:
        RECORD.begin(f"evaluation after iteration {iteration}", iteration, "evaluation")
        loss = evaluate(trainer, data.eval_batches())
        reporter.line(f" validation at iteration {iteration} | lm loss: {loss:.6E}")
        reporter.scalars(iteration, {"validation-lm-loss": loss})
        return loss

    trainable = sum(p.numel() for p in trainer.parameters() if p.requires_grad)
    microbatches_per_step = config.microbatches_per_step
    pipeline = ""
    if state.pp_size > 1:
        bubble = bubble_fraction(state.pp_size, len(chunks), microbatches_per_step)
        pipeline = (f", {len(chunks)} model chunk(s) per stage, pipeline bubble (pp-1)/(vp*M) = "
                    f"{100 * bubble:.1f}% of the ideal step time")
    reporter.line(
        f" megamm: world {state.world_size} = tp {state.tp_size} x cp {state.cp_size} x dp {state.dp_size} "
        f"x pp {state.pp_size}, "
        f"{microbatches_per_step} microbatch(es) of {t.micro_batch_size} per step{pipeline}, "
        f"{trainable:,} trainable parameters on this rank"
    )
    checkpointer = None
    load = resume_dir(t)
    if t.save or load:
        checkpointer = Checkpointer(state, config, trainer.chunks, trainer.optimizer, trainer.scaler,
                                    save_dir=t.save, keep_last=t.keep_last_checkpoints, async_save=t.async_save,
                                    log=reporter.line)
    resume = ResumePoint()
    if load:
        RECORD.enter(f"loading checkpoint {load}")
        progress = checkpointer.load(
            load,
            load_optim=t.load_optim and not t.finetune,
            load_rng=t.load_rng and not t.finetune,
            reset_progress=t.finetune,
            verify=t.verify_checkpoint,
        )
        if progress is not None:
            resume = ResumePoint(progress.iteration, progress.consumed_samples)
    start = resume.iteration
    # Built after loading: a resumed run's loader continues from the checkpoint's consumed samples.
    RECORD.enter("building the data loader")
    data = build_training_data(
        config, state, resume, microbatch_multiple=state.pp_size if len(chunks) > 1 else 1,
        log=print if state.tp_rank == 0 and state.cp_rank == 0 and state.is_first_stage else _quiet,
    )
    reporter.line(f" data: {data.describe()}")
    stats, skipped, skipped_in_a_row = IntervalStats(), 0, 0
    first_loss, last_loss, eval_loss = float("nan"), float("nan"), float("nan")
    saved_at, done, stopped = start, start, None
    started = time.perf_counter()
    compiling = t.torch_compile
    for iteration in range(start, t.train_iters):
        busy = RECORD.busy_seconds()
        RECORD.begin(f"iteration {iteration + 1}", iteration + 1, "data loading")
        microbatches = data.microbatches(iteration)
        plan = data.plan()
        tick = time.perf_counter()
        result = train_step(trainer, microbatches, iteration)
        # Enqueued before the synchronization below, so reading it after costs no extra host sync.
        RECORD.enter("stop-flag all-reduce over the world", waiting=True)
        stop_flags = stop.share(state)
        if state.device.type == "cuda":
            RECORD.enter("device synchronization at the end of the step")
            torch.cuda.synchronize(state.device)
        if compiling:
            # The first step compiles the layers' graphs: logged once, left out of the throughput.
            compiling = False
            reporter.line(f" torch.compile: the first step took {time.perf_counter() - tick:.1f} s, graph "
                          "compilation included; it is not counted in tokens/s")
        else:
            stats.seconds += time.perf_counter() - tick
            stats.busy_seconds += RECORD.busy_seconds() - busy
            stats.steps += 1
            stats.flops += step_flops(trainer.model.config, t.seq_length, rows_in(microbatches),
                                      vision_inputs(microbatches, config.model))
            stats.rows += rows_in(microbatches)
        stats.grad_norms.append(result.grad_norm)
        if plan is not None:
            stats.plans.append(plan)
        if result.applied:
            skipped_in_a_row = 0
            stats.loss_sum += result.loss
            stats.loss_steps += 1
            last_loss = result.loss
            if math.isnan(first_loss):
                first_loss = result.loss
        else:
            skipped += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= t.max_skipped_iters_in_a_row and checkpointer is not None:
                checkpointer.wait()
            if skipped_in_a_row >= t.max_skipped_iters_in_a_row:
                raise RuntimeError(
                    f"stopping at iteration {iteration + 1}: {skipped_in_a_row} iterations in a row had a "
                    f"non-finite loss or gradient (last loss {result.loss}, grad norm {result.grad_norm}); "
                    "lower --lr (or --initial-loss-scale with --fp16), check the data, or use --bf16 instead of --fp16"
                )
        done = iteration + 1
        consumed = resume.first_position(done, t.global_batch_size)
        stopped = stop.reason(stop_flags, done) if done < t.train_iters else None
        reporter.progress(done, t.train_iters, result.loss)
        if done % t.log_interval == 0 or done == t.train_iters or stopped:
            _log(reporter, trainer, done, consumed, stats, skipped, result.lr)
            stats = IntervalStats()
        if t.eval_iters and t.eval_interval and done % t.eval_interval == 0:
            eval_loss = run_eval(done)
        if t.save and t.save_interval and done % t.save_interval == 0:
            RECORD.begin(f"after iteration {done}", done, "checkpoint save")
            checkpointer.save(done, consumed)
            saved_at = done
        if stopped:
            break
    if not stopped and t.eval_iters and (not t.eval_interval or t.train_iters % t.eval_interval):
        eval_loss = run_eval(t.train_iters)
    if t.save and saved_at != done:
        RECORD.begin(f"after iteration {done}", done, "final checkpoint save")
        checkpointer.save(done, resume.first_position(done, t.global_batch_size))
    if checkpointer is not None:
        RECORD.begin("end of training", done, "waiting for the checkpoint writes")
        checkpointer.wait()
    if stopped:
        saved = f"checkpoint of iteration {done} in {t.save}" if t.save else "no checkpoint (no --save)"
        reporter.line(f" stopping after iteration {done} of {t.train_iters}: {stopped}; {saved}; "
                      f"exiting with status {EXIT_STOPPED} (run the same command again to continue)")
    elapsed = time.perf_counter() - started
    state_bytes = trainer.optimizer.state_bytes()
    validation = f"validation lm loss: {eval_loss:.6E} | " if t.eval_iters else ""
    RECORD.begin("end of training", done, "summary-line reductions")
    data_line, data_counts = _data_counts(data, state)
    reporter.line(
        f" done: {done} iterations in {elapsed:.1f} s | final lm loss: {last_loss:.6E} | "
        f"{validation}skipped iterations: {skipped} | {data_line}"
        f"optimizer state per rank: {state_bytes:,} bytes ({state_bytes / max(trainable, 1):.2f} per "
        f"trainable parameter) | peak memory (GiB): {peak_memory_gib(state.device):.2f}"
    )
    reporter.close()
    return {"first_loss": first_loss, "final_loss": last_loss, "eval_loss": eval_loss, "skipped": skipped,
            "optimizer_state_bytes": trainer.optimizer.state_bytes(), "data": data_counts, "stopped": stopped}


def main(argv: list[str] | None = None) -> int:
    _single_process_env()
    try:
        config = read_config(argv, int(os.environ["WORLD_SIZE"]))
    except ConfigError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megamm.train: {error}", file=sys.stderr)
        return 2
    try:
        figures = run(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_STOPPED if figures["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
