"""Activation memory per rank and step time of one long multimodal sample at context-parallel sizes 1, 2, 4.

What is measured: forward + backward of `LlavaModel` (tiny widths, fp32, CPU, gloo) on one sample of
--seq-length tokens (default 16384) holding --images images (default 96 images x 65 tokens = 6240
image tokens, spread over the sequence), the loss averaged over its tokens as the training step does.
For each cp size the benchmark spawns cp processes (a fresh process per configuration, so the
high-water marks below belong to that configuration alone), and each rank reports

- saved activations: the bytes autograd keeps for backward at the end of the forward, counted by a
  `torch.autograd.graph.saved_tensors_hooks` pack hook over distinct storages, parameters excluded.
  This is the activation memory that context parallelism is meant to divide (torch has no allocator
  statistics for CPU tensors, and this count is exact and independent of the allocator);
- peak RSS increase: the process's resident-set high-water mark (getrusage ru_maxrss) after the steps
  minus its resident set before the first one (the model built, the sample made). It includes transient buffers (the ring's score tiles, the
  collectives' buffers) and whatever the CPU allocator keeps cached, so it is an upper bound;
- image-embedding rows received: the bytes of image embeddings that arrive at the rank in one forward,
  in the model's targeted exchange (each rank gets the rows of the image tokens among its positions,
  `megamm.models.image_shares`) and, side by side on the same encoded shares, in an all-gather of
  every rank's share padded to the largest (what each rank held before the exchange was targeted);
  both run after the steps in lockstep (a barrier before each, no grad) and are timed (median of
  --repeats after one warm-up), each ending with this rank's rows;
- step time: the median wall time of --repeats forward + backward passes after one warm-up.
  The cp processes of one configuration share the machine's cores; each gets cores / cp threads
  (at least one), so the configurations use the same total threads. On a machine with fewer cores than
  ranks the times measure oversubscription, not scaling; the memory figures do not depend on it.

With --packed-masks the benchmark measures instead what a packed row's attention mask costs ring
attention, per rank, at cp = 2 and 4 (cp = 1 does not run the ring): one --seq-length row packing
--packed-samples equal samples (the last one 100 tokens short, then padding), one attention core
(the model's heads, GQA groups and head dim; fp32) forward + backward, the mask in each of its two
forms, each in a fresh process: "dense", the `[s, s]` block-causal mask the batches used to carry and
the `[s/cp, s]` rows of it the language model passed every layer; "segment ids", the `[s]` int64
segment ids the batches carry now, from which the ring derives each tile's mask. Reported: the bytes
the microbatch carries, the bytes the ring keeps for backward for the mask (a saved-tensors hook on
the mask's storages), and the peak RSS increase over building the mask from the row's cu_seqlens and
the forward + backward.

On CUDA (--device cuda, one GPU per rank) the peak is `torch.cuda.max_memory_allocated` instead of RSS;
the ring attention's per-block math is the plain torch path there (no fused GPU kernel per block).
The CUDA option has not run yet (no GPU was available).

Run from the repository root with megamm installed:

    python bench/bench_context_parallel.py
    python bench/bench_context_parallel.py --seq-length 32768 --images 192 --cp 1 2 4
    python bench/bench_context_parallel.py --packed-masks --cp 2 4
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig
from megamm.data.packing import block_causal_mask, segment_ids
from megamm.models.image_shares import VisionShares, local_vision_embeddings, vision_ordinals
from megamm.models.llava import LlavaModel
from megamm.parallel.context import split_sequence
from megamm.parallel.state import initialize_parallel_state
from megamm.transformer.ring_attention import ring_attention
from megamm.transformer.segments import PackedRows

IMAGE_TOKEN_ID = 99


def model_config(seq_length: int) -> LlavaConfig:
    """A tiny LLaVA: 32x32 images in 4x4 patches (64 patches + class token = 65 tokens per image),
    a 2-layer decoder with GQA (4 heads, 2 key/value groups)."""
    vision = VisionConfig(
        TransformerConfig(hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64,
                          normalization="layernorm", activation="quick_gelu", add_bias_linear=True,
                          position_embedding="learned", causal=False),
        image_size=32, patch_size=4,
    )
    language = LanguageConfig(
        TransformerConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, max_position_embeddings=seq_length),
        vocab_size=100, make_vocab_size_divisible_by=4, image_token_id=IMAGE_TOKEN_ID,
    )
    return LlavaConfig(vision=vision, language=language, projector=ProjectorConfig())


def sample(config: LlavaConfig, seq_length: int, images: int) -> dict[str, torch.Tensor]:
    """One sample: images spread evenly over the sequence, text between them (the same on every rank)."""
    generator = torch.Generator().manual_seed(0)
    per_image = config.image_tokens_per_image
    if images * per_image > seq_length:
        raise SystemExit(f"--images {images} x {per_image} tokens do not fit in --seq-length {seq_length}")
    input_ids = torch.randint(0, IMAGE_TOKEN_ID, (1, seq_length), generator=generator)
    stride = seq_length // max(images, 1)
    for i in range(images):
        input_ids[0, i * stride : i * stride + per_image] = IMAGE_TOKEN_ID
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    size = config.vision.image_size
    pixel_values = torch.randn(images, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, cp: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    cuda = args.device == "cuda"
    state = initialize_parallel_state(use_cuda=cuda, context_parallel_size=cp)
    config = model_config(args.seq_length)
    model = LlavaModel(config, state)
    model.initialize(0)
    batch = {k: v.to(state.device) for k, v in sample(config, args.seq_length, args.images).items()}
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(measure: bool) -> tuple[float, int]:
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if measure and storage.data_ptr() not in parameters:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        dist.barrier()
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch)["loss"].sum() / tokens
        saved = sum(seen.values())
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return elapsed, saved

    # The resident set before any step: the high-water mark of the steps (warm-up included, the same
    # work) above it is what the step needs; measured after the warm-up, memory the allocator cached
    # in it would hide part of the step's.
    before = _rss_bytes()
    step(False)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats(state.device)
    times, saved = [], 0
    for _ in range(args.repeats):
        elapsed, saved = step(True)
        times.append(elapsed)
    if cuda:
        peak = torch.cuda.max_memory_allocated(state.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    exchanges = _image_exchanges(model, batch, state, args.repeats)
    results.put((rank, pickle.dumps({"saved": saved, "peak": peak, "time": statistics.median(times), **exchanges})))
    dist.destroy_process_group()


def _mask_worker(rank: int, cp: int, port: int, args: argparse.Namespace, results) -> None:
    """One packed row's attention core under ring attention with the mask in one form (args.form)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    state = initialize_parallel_state(use_cuda=args.device == "cuda", context_parallel_size=cp)
    s, n = args.seq_length, args.packed_samples
    cu_seqlens = [i * (s // n) for i in range(n)] + [n * (s // n) - 100]
    attention = model_config(s).language.transformer
    generator = torch.Generator().manual_seed(rank)
    shapes = [(1, attention.num_attention_heads, s // cp, attention.head_dim)]
    shapes += [(1, attention.query_groups, s // cp, attention.head_dim)] * 2
    q, k, v = (torch.randn(shape, generator=generator).to(state.device).requires_grad_() for shape in shapes)
    inputs = {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}
    dist.barrier()
    before = _rss_bytes()
    started = time.perf_counter()
    if args.form == "dense":
        carried = block_causal_mask(cu_seqlens, s)[None, None].to(state.device)  # [1, 1, s, s]
        form = {"mask": split_sequence(carried, state, dim=-2)}  # this rank's rows, [1, 1, s/cp, s]
        mask_storages = {form["mask"].untyped_storage().data_ptr()}
    else:
        carried = segment_ids(cu_seqlens, s)[None].to(state.device)  # [1, s]
        form = {"segments": PackedRows(carried)}
        mask_storages = {carried.untyped_storage().data_ptr()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in mask_storages and storage.data_ptr() not in inputs:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = ring_attention(q, k, v, state, causal=True, **form)
    out.sum().backward()
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    results.put((rank, pickle.dumps({"carried": carried.nbytes, "kept": sum(kept.values()), "peak": peak,
                                     "time": elapsed})))
    dist.destroy_process_group()


def _packed_masks(args: argparse.Namespace) -> None:
    print(f"one packed row of {args.seq_length} tokens ({args.packed_samples} samples), one attention core "
          f"forward + backward; {args.device}, fp32; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"{'cp':>3} {'mask form':>12} {'carried by the microbatch (MiB)':>32} {'kept for backward / rank (MiB)':>31} "
          f"{'peak increase / rank (MiB)':>27} {'time (s)':>9}")
    for cp in args.cp:
        for form in ("segment ids", "dense"):
            args.form = form
            ranks = run(cp, args, _mask_worker)
            carried = max(r["carried"] for r in ranks) / 2**20
            kept = max(r["kept"] for r in ranks) / 2**20
            peak = max(r["peak"] for r in ranks) / 2**20
            seconds = max(r["time"] for r in ranks)
            print(f"{cp:>3} {form:>12} {carried:>32.3f} {kept:>31.3f} {peak:>27.1f} {seconds:>9.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _image_exchanges(model: LlavaModel, batch: dict[str, torch.Tensor], state, repeats: int) -> dict[str, float]:
    """Bytes received and median seconds of two exchanges of this rank's encoded image rows, each
    ending with the rows of the image tokens among its positions, run alike (lockstep, no grad,
    one warm-up): the model's targeted exchange, and an all-gather of every rank's share padded to
    the largest followed by the same selection (the exchange before it was targeted)."""
    if state.cp_size == 1:
        return {"targeted": 0, "gathered": 0, "targeted_time": 0.0, "gathered_time": 0.0}
    images = batch["input_ids"] == model.config.language.image_token_id
    n, tokens = batch["pixel_values"].shape[0], model.image_tokens_per_image
    shares = VisionShares.balanced([1] * n, [tokens] * n, state.cp_size)
    widest = max(shares.rows_of(r) for r in range(state.cp_size))
    owner, row = shares.source_rows()
    needed = vision_ordinals([images.cpu()], state.cp_size, state.cp_rank)
    with torch.no_grad():
        rows = model.encode_images(batch["pixel_values"][shares.items_of(state.cp_rank)]).flatten(0, 1)

        def targeted() -> int:
            return local_vision_embeddings(rows, shares, [images], state).nbytes

        def gathered() -> int:
            padded = torch.cat([rows, rows.new_zeros(widest - rows.shape[0], rows.shape[1])])
            parts = [torch.empty_like(padded) for _ in range(state.cp_size)]
            dist.all_gather(parts, padded, group=state.cp_group)
            torch.cat(parts).index_select(0, (owner * widest + row)[needed].to(rows.device))
            return sum(part.nbytes for part in parts)

        measured: dict[str, float] = {}
        for name, exchange in (("targeted", targeted), ("gathered", gathered)):
            times = []
            for _ in range(repeats + 1):
                dist.barrier(group=state.cp_group)
                started = time.perf_counter()
                measured[name] = exchange()
                times.append(time.perf_counter() - started)
            measured[f"{name}_time"] = statistics.median(times[1:])
    return measured


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cp: int, args: argparse.Namespace, worker=_worker) -> list[dict]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=worker, args=(rank, cp, port, args, results)) for rank in range(cp)]
    for process in processes:
        process.start()
    collected = dict(results.get(timeout=args.timeout) for _ in range(cp))
    for process in processes:
        process.join()
    return [pickle.loads(collected[rank]) for rank in range(cp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--packed-masks", action="store_true",
                        help="measure a packed row's attention mask under ring attention, dense vs segment ids")
    parser.add_argument("--packed-samples", type=int, default=8, help="samples in the --packed-masks row")
    args = parser.parse_args()
    if args.packed_masks:
        if 1 in args.cp:
            parser.error("--packed-masks measures ring attention: give --cp sizes > 1 (e.g. --cp 2 4)")
        _packed_masks(args)
        return
    config = model_config(args.seq_length)
    print(f"one sample of {args.seq_length} tokens, {args.images} images x {config.image_tokens_per_image} "
          f"tokens; {args.device}, fp32; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"{'cp':>3} {'saved activations / rank (MiB)':>31} {'vs cp=1':>8} {'peak increase / rank (MiB)':>27} "
          f"{'vs cp=1':>8} {'step time (s)':>14} {'image rows in: targeted / all-gather (MiB)':>43} "
          f"{'ratio':>6} {'exchange time: targeted / all-gather (ms)':>42}")
    base_saved = base_peak = None
    for cp in args.cp:
        ranks = run(cp, args)
        saved = max(r["saved"] for r in ranks) / 2**20
        peak = max(r["peak"] for r in ranks) / 2**20
        seconds = max(r["time"] for r in ranks)
        targeted = max(r["targeted"] for r in ranks) / 2**20
        gathered = max(r["gathered"] for r in ranks) / 2**20
        exchange = f"{max(r['targeted_time'] for r in ranks) * 1e3:.2f} / {max(r['gathered_time'] for r in ranks) * 1e3:.2f}"
        ratio = f"{targeted / gathered:.3f}" if gathered else "-"
        base_saved = base_saved or saved
        base_peak = base_peak or peak
        print(f"{cp:>3} {saved:>31.1f} {saved / base_saved:>8.3f} {peak:>27.1f} {peak / base_peak:>8.3f} "
              f"{seconds:>14.2f} {f'{targeted:.2f} / {gathered:.2f}':>43} {ratio:>6} {exchange:>42}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
