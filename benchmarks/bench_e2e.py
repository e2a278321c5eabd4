#!/usr/bin/env python
"""End-to-end decode benchmark: a 7B-shaped LLaMA-like model with every decoder linear layer quantized, vs fp16.

The model is ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (default: 32 layers, hidden 4096,
intermediate 11008, 32 heads, vocab 32000 — the LLaMA-2-7B / LLaVA-1.5-7B language model shape) with random
weights, built directly in the benchmark dtype on the GPU (``torch.device`` context + default dtype: no fp32
copy is ever allocated). For a quantized variant every ``nn.Linear`` inside the decoder layers (q/k/v/o,
gate/up/down: 224 layers at 32 layers) is replaced by a :class:`bivlm_kernels.nn.QuantLinear` filled with random
codes and codebooks/scales (no calibration: speed does not depend on the values); embeddings, norms and
``lm_head`` stay fp16, as in the real quantized checkpoints.

For each variant (fp16, lut1, lut2, affine4, optionally mixed) and kernel path (``--backends``), with a
``StaticCache`` holding ``prompt + gen`` positions:

* prefill of ``--prompt`` random tokens (eager, timed once, after one warm-up prefill);
* ``eager``: a greedy generation of ``--gen`` tokens, every step launched from Python; the next token is the
  argmax of the logits, fed back on the device (no host sync per token);
* ``graph``: the same decode step captured once in a CUDA graph (static input ids, positions, attention mask
  and KV cache) and replayed for every token.

Reported: median decode-step latency (CUDA events around the forward), tokens/s of the whole generation loop
(batch x gen / wall time, argmax and buffer updates included), prefill ms, weight memory and peak GPU memory
(``torch.cuda.max_memory_allocated`` from just before the prefill to the end of the variant), speedup vs fp16
in the same mode, and whether graph replay generated exactly the eager tokens.

Without a GPU the script prints that it skips; ``--dry-run`` prints the plan; ``--smoke`` runs a 2-layer tiny
model on the CPU (reference backend, eager only), labelled as not GPU results.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import bench_common as bc  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402

from bivlm_kernels import ops  # noqa: E402

QUANT_FORMATS = ("lut1", "lut2", "affine4", "mixed")
DEFAULT_FORMATS = "fp16,lut1,lut2,affine4"
SMOKE_CFG = dict(layers=2, hidden=256, intermediate=512, heads=4, vocab=512, prompt=8, gen=4)
COLUMNS = ("format", "backend", "mode", "layers", "batch", "prompt", "gen", "bits_per_weight",
           "linear_weight_MB", "model_weight_MB", "peak_MB", "prefill_ms", "step_ms", "step_p20_ms",
           "step_p80_ms", "tokens_per_s", "speedup", "graph_matches_eager", "status", "wall_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma list of fp16 and {', '.join(QUANT_FORMATS)} (default: %(default)s)")
    p.add_argument("--backends", default="auto",
                   help="kernel paths for the quantized variants: auto (what QuantLinear dispatches to) or a "
                        "comma list of cuda, triton, reference; missing ones are skipped (default: %(default)s)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default: %(default)s)")
    p.add_argument("--intermediate", type=int, default=11008, help="MLP size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=32, help="attention (and KV) heads (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default: %(default)s)")
    p.add_argument("--gen", type=int, default=64, help="generated tokens (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-graph", action="store_true", help="eager only (skip the CUDA-graph replay mode)")
    p.add_argument("--quick", action="store_true", help="fp16,lut1,lut2 only and --gen 32")
    p.add_argument("--budget-s", type=float, default=None,
                   help="do not start a new variant after this many seconds")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/e2e_<UTC date>; smoke: a temp folder)")
    p.add_argument("--triton-configs", default=None,
                   help="JSON of Triton launch configs saved by an earlier run (triton_tuned_configs.json) to "
                        "load instead of tuning on first use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the code paths: a 2-layer tiny model, reference backend, eager only")
    a = p.parse_args(argv)
    if a.quick:
        if a.formats == DEFAULT_FORMATS:
            a.formats = "fp16,lut1,lut2"
        if a.gen == 64:
            a.gen = 32
    if a.smoke:
        for k, v in SMOKE_CFG.items():
            setattr(a, k, v)
        a.no_graph = True
        if a.backends == "auto":
            a.backends = "reference"
    a.formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in a.formats if f != "fp16" and f not in QUANT_FORMATS]
    if bad:
        p.error(f"unknown formats {bad}")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in a.backends if b not in ("auto", "cuda", "triton", "reference")]
    if bad:
        p.error(f"unknown backends {bad}")
    a.torch_dtype = getattr(torch, a.dtype)
    a.modes = ["eager"] if a.no_graph else ["eager", "graph"]
    return a


def variants(args, device) -> tuple:
    """[(format, backend)] to run, notes about paths that are missing."""
    out, notes = [], []
    if "fp16" in args.formats:
        out.append(("fp16", "torch"))
    for b in args.backends:
        if b != "auto" and device is not None:
            avail = set(ops.available_backends("lut_linear", device)) & set(
                ops.available_backends("affine_linear", device))
            if b not in avail:
                notes.append(f"{b}: not available on {device} (skipped)")
                continue
        out += [(f, b) for f in args.formats if f != "fp16"]
    return out, notes


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------

def build_model(args, device):
    """Random-weight LlamaForCausalLM built directly in ``args.dtype`` on ``device`` (no fp32 allocation)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(2048, args.prompt + args.gen),
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(args.torch_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False), cfg


def quantize_random_(model, fmt_name: str, args, device) -> float:
    """Replace every decoder nn.Linear by a random-code QuantLinear of ``fmt_name``; return its honest bits."""
    from bench_kernels import FORMATS, buffer_bytes, random_quant_layer
    fmt = FORMATS[fmt_name]
    nbytes = nweights = 0
    targets = [(name, m) for name, m in model.model.layers.named_modules() if type(m) is torch.nn.Linear]
    while targets:                      # pop, so that each fp16 weight is freed as soon as it is replaced
        name, lin = targets.pop(0)
        parent_name, _, child = name.rpartition(".")
        parent = model.model.layers.get_submodule(parent_name)
        q = random_quant_layer(fmt, lin.out_features, lin.in_features, args.group_size, args.torch_dtype, device)
        setattr(parent, child, q)
        nbytes += buffer_bytes(q)
        nweights += lin.out_features * lin.in_features
        del lin
    return nbytes * 8 / nweights


def linear_weight_bytes(model) -> int:
    total = 0
    for m in model.model.layers.modules():
        if type(m) is torch.nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "segments") and hasattr(m, "spec"):
            total += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if not n.endswith("bias"))
    return total


# ---------------------------------------------------------------------------------------------------------
# decode loop
# ---------------------------------------------------------------------------------------------------------

class Decoder:
    """Static buffers around one model + StaticCache so that a decode step can be replayed from a CUDA graph.

    The attention mask is passed as a ready 4-D boolean mask ``[B, 1, 1, max_len]`` (True = attend), so HF's
    mask construction (which may synchronize) is bypassed; positions are a static ``[B, 1]`` tensor.
    """

    def __init__(self, model, cfg, args, device):
        from transformers import StaticCache
        self.model, self.device, self.b = model, device, args.batch
        self.p, self.max_len = args.prompt, args.prompt + args.gen + 8
        self.cache = StaticCache(config=cfg, max_cache_len=self.max_len)
        self.ids = torch.zeros(self.b, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(self.b, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(self.b, 1, 1, self.max_len, dtype=torch.bool, device=device)
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        self.prompt_ids = torch.randint(0, cfg.vocab_size, (self.b, self.p), generator=g).to(device)
        self.graph = None

    def prefill(self):
        """Fill the cache with the prompt; return the first generated token [B, 1]."""
        self._reset(0)
        causal = torch.ones(self.p, self.max_len, dtype=torch.bool, device=self.device).tril()
        mask = causal[None, None].expand(self.b, 1, self.p, self.max_len)
        pos = torch.arange(self.p, device=self.device)[None].expand(self.b, -1)
        logits = self.model(input_ids=self.prompt_ids, attention_mask=mask, position_ids=pos,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _reset(self, length: int):
        """Set the cache's fill level (positions >= length are overwritten later) and the mask to match."""
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(length)
        self.mask.zero_()
        self.mask[..., :length] = True

    def step(self):
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits

    def capture(self):
        self._set_pos(self.p)
        self.graph = bc.Graphed(self.step, warmup=2)

    def _set_pos(self, p: int):
        self.pos.fill_(p)
        self.mask[..., p] = True

    def generate(self, first_tok, n: int, mode: str, timer) -> tuple:
        """Greedy-decode ``n`` tokens after the prompt; returns (tokens [B, n], per-step ms, total s)."""
        self._reset(self.p)
        tok, toks, times = first_tok, [], []
        t0 = timer.now()
        for i in range(n):
            self.ids.copy_(tok)
            self._set_pos(self.p + i)
            with timer.span(times):
                if mode == "graph":
                    self.graph()
                    logits = self.graph.out
                else:
                    logits = self.step()
            tok = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
        out = torch.cat(toks, dim=1)
        total = timer.now(sync=True) - t0
        return out, timer.values(times), total


class _EventSpan:
    def __init__(self, store: list):
        self.store = store

    def __enter__(self):
        self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.s.record()

    def __exit__(self, *exc):
        self.e.record()
        self.store.append((self.s, self.e))
        return False


class _WallSpan(_EventSpan):
    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.store.append((time.perf_counter() - self.t) * 1e3)
        return False


class CudaTimer:
    """Per-step CUDA events (read after the run) and wall time with a final synchronize."""

    def now(self, sync: bool = True) -> float:
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def span(self, store: list):
        return _EventSpan(store)

    def values(self, store) -> list:
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in store]


class CpuTimer:
    """Wall-clock spans: smoke runs only."""

    def now(self, sync: bool = True) -> float:
        return time.perf_counter()

    def span(self, store: list):
        return _WallSpan(store)

    def values(self, store) -> list:
        return list(store)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(fmt, backend, args, device) -> list:
    """Build, quantize, prefill and decode one variant; return one row per mode."""
    cuda = device.type == "cuda"
    timer = CudaTimer() if cuda else CpuTimer()
    base = {"format": fmt, "backend": backend, "layers": args.layers, "batch": args.batch, "prompt": args.prompt,
            "gen": args.gen}
    t_start = time.monotonic()
    torch.manual_seed(args.seed)
    model, cfg = build_model(args, device)
    bpw = 8.0 * torch.empty((), dtype=args.torch_dtype).element_size()
    if fmt != "fp16":
        bpw = quantize_random_(model, fmt, args, device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base.update(bits_per_weight=bpw, linear_weight_MB=linear_weight_bytes(model) / 1e6,
                model_weight_MB=(torch.cuda.memory_allocated(device) / 1e6 if cuda else
                                 sum(t.numel() * t.element_size() for t in
                                     list(model.parameters()) + list(model.buffers())) / 1e6))
    ctx = ops.use_backend(backend) if backend not in ("torch", "auto") else _null()
    if backend == "auto":                               # say which path auto dispatch actually took
        base["backend"] = "auto→" + "/".join(sorted({ops.select_backend(op, device)
                                                     for op in ("lut_linear", "affine_linear")}))
    rows = []
    with ctx, torch.no_grad():
        dec = Decoder(model, cfg, args, device)
        dec.prefill()                                   # warm-up (lazy cache allocation, kernel JIT)
        _sync(device)
        t0 = time.perf_counter()
        first = dec.prefill()
        _sync(device)
        base["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        dec.generate(first, min(3, args.gen), "eager", timer)        # warm-up of the decode shapes
        eager_toks = None
        for mode in args.modes:
            row = dict(base, mode=mode)
            t1 = time.monotonic()
            try:
                if mode == "graph":
                    dec.capture()
                toks, steps, total = dec.generate(first, args.gen, mode, timer)
                q = sorted(steps)
                row.update(step_ms=statistics.median(q), step_p20_ms=q[int(0.2 * (len(q) - 1))],
                           step_p80_ms=q[int(round(0.8 * (len(q) - 1)))],
                           tokens_per_s=args.batch * args.gen / total, status="ok")
                if mode == "eager":
                    eager_toks = toks
                elif eager_toks is not None:
                    row["graph_matches_eager"] = "yes" if torch.equal(toks, eager_toks) else "no"
            except Exception as e:  # noqa: BLE001 - report and keep going
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                row["status"] = f"error: {type(e).__name__}: {msg}"
                if cuda:
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        pass
            row["wall_s"] = round(time.monotonic() - t1, 1)
            row["peak_MB"] = torch.cuda.max_memory_allocated(device) / 1e6 if cuda else None
            rows.append(row)
            print("  " + _line(row), flush=True)
    del dec, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"  ({fmt}/{backend} took {time.monotonic() - t_start:.0f}s)", flush=True)
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _line(r) -> str:
    if r.get("tokens_per_s") is None:
        return f"{r['format']:>8} {r['backend']:<9} {r['mode']:<5} {r['status']}"
    return (f"{r['format']:>8} {r['backend']:<9} {r['mode']:<5} step {r['step_ms']:8.2f} ms  "
            f"{r['tokens_per_s']:8.1f} tok/s  peak {bc.fmt(r.get('peak_MB'), '.0f')} MB  "
            f"weights {r['model_weight_MB']:.0f} MB  {r['status']}")


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------

def write_outputs(out: Path, rows, info, args, notes, not_run, smoke, final: bool = True) -> None:
    fp16 = {r["mode"]: r.get("tokens_per_s") for r in rows if r["format"] == "fp16"}
    for r in rows:
        if r.get("tokens_per_s") and fp16.get(r["mode"]):
            r["speedup"] = r["tokens_per_s"] / fp16[r["mode"]]
    bc.write_csv(out / "e2e.csv", rows, COLUMNS)
    (out / "e2e_env.json").write_text(json.dumps(info, indent=2) + "\n")
    title = "bivlm end-to-end decode benchmark" + (" — CPU SMOKE TEST, NOT GPU RESULTS" if smoke else "")
    if not final:
        title += " (PARTIAL: run still in progress or interrupted)"
    md = [bc.env_markdown(info, title), "## Method\n", METHOD_TEXT.format(**vars(args))]
    if notes:
        md.append("## Paths not measured\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    md.append("## Results\n\n" + bc.md_table(rows, [
        ("format", "format"), ("path", "backend"), ("mode", "mode"),
        ("bits/w (linears)", lambda r: bc.fmt(r.get("bits_per_weight"), ".3g")),
        ("decoder linears MB", lambda r: bc.fmt(r.get("linear_weight_MB"), ".0f")),
        ("weights MB", lambda r: bc.fmt(r.get("model_weight_MB"), ".0f")),
        ("peak MB", lambda r: bc.fmt(r.get("peak_MB"), ".0f")),
        ("prefill ms", lambda r: bc.fmt(r.get("prefill_ms"), ".1f")),
        ("step ms (p20–p80)", lambda r: "–" if r.get("step_ms") is None else
         f"{r['step_ms']:.2f} ({r['step_p20_ms']:.2f}–{r['step_p80_ms']:.2f})"),
        ("tokens/s", lambda r: bc.fmt(r.get("tokens_per_s"), ".1f")),
        ("speedup vs fp16", lambda r: bc.fmt(r.get("speedup"), ".2f", "x")),
        ("graph = eager tokens", "graph_matches_eager"), ("status", "status")]))
    if not_run:
        md.append("## Not run\n\nTime budget exhausted before: " + ", ".join(f"{f}/{b}" for f, b in not_run) + "\n")
    (out / "e2e.md").write_text("\n".join(md))


METHOD_TEXT = """\
- Model: `transformers.LlamaForCausalLM`, {layers} layers, hidden {hidden}, intermediate {intermediate}, {heads}
  heads, vocab {vocab}, random weights built directly in {dtype} on the device; batch {batch}; sdpa attention.
- Quantized variants: every nn.Linear in the decoder layers replaced by a random-code `QuantLinear`
  (group size {group_size}); embeddings, norms, lm_head stay dense. bits/w = honest bits of those linears.
- StaticCache of prompt + gen + 8 positions; prefill of {prompt} random tokens (eager, timed after a warm-up);
  greedy generation of {gen} tokens, the next token taken by argmax on the device.
- `eager`: each step is a Python forward. `graph`: one decode step captured in a CUDA graph (static ids,
  positions, 4-D bool attention mask and KV cache) and replayed per token.
- step ms: median (p20–p80) of CUDA-event times around each step's forward. tokens/s: batch x gen / wall time
  of the whole loop (argmax, buffer updates included; one synchronize at the end). peak MB:
  `torch.cuda.max_memory_allocated` since the weights were in place. speedup: tokens/s over fp16, same mode.
"""


def run(args, device) -> int:
    smoke = device.type != "cuda"
    out = bc.prepare_out_dir(args.out, smoke, "e2e")
    info = bc.env_info(device, smoke=smoke)
    if device.type == "cuda" and args.triton_configs:
        n_cfg = bc.load_triton_tuned_configs(args.triton_configs)
        info["triton_configs_loaded"] = f"{n_cfg} from {args.triton_configs}" if n_cfg is not None else "none"
    info.update({"modes": ", ".join(args.modes), "dtype": args.dtype})
    todo, notes = variants(args, device)
    budget = bc.Budget(args.budget_s)
    print(f"[bench_e2e] {info['device']}; variants {todo}; modes {args.modes}; output -> {out}", flush=True)
    for n in notes:
        print(f"[bench_e2e] {n}", flush=True)
    rows, not_run = [], []
    for fmt, backend in todo:
        if budget.exceeded():
            not_run.append((fmt, backend))
            continue
        try:
            rows += run_variant(fmt, backend, args, device)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory building a variant
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            rows.append({"format": fmt, "backend": backend, "mode": "-", "status": f"error: {type(e).__name__}: "
                                                                                  f"{msg}"})
            print(f"  {fmt}/{backend}: {rows[-1]['status']}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write_outputs(out, rows, info, args, notes, not_run, smoke, final=False)
    info["elapsed_s"] = round(budget.elapsed(), 1)
    if device.type == "cuda":
        info["clocks_note_end"] = bc.clocks_note(bc.nvidia_smi(device.index or 0))
    write_outputs(out, rows, info, args, notes, not_run, smoke)
    print(f"[bench_e2e] done in {budget.elapsed():.0f}s -> {out / 'e2e.md'}", flush=True)
    if smoke:
        print(f"[bench_e2e] {bc.SMOKE_BANNER}", flush=True)
    return 0


def dry_run(args) -> int:
    device = bc.cuda_or_none()
    todo, notes = variants(args, device)
    h, i, nl = args.hidden, args.intermediate, args.layers
    lin = nl * (4 * h * h + 3 * h * i)
    print(f"plan: {len(todo)} variants x modes {args.modes}: {todo}")
    print(f"model: {nl} layers, hidden {h}, intermediate {i}, vocab {args.vocab}; decoder linear weights "
          f"{lin / 1e9:.2f} G params = {lin * 2 / 1e9:.1f} GB fp16; batch {args.batch}, prompt {args.prompt}, "
          f"gen {args.gen}")
    for n in notes:
        print("note:", n)
    print(f"estimated time: ~{len(todo) * (25 + 5 * len(args.modes)) / 60:.1f} min on an H100 (model build "
          f"+ quantize + prefill + {args.gen} tokens per mode), more if Triton autotunes; cap with --budget-s")
    return 0


def main(argv=None) -> int:
    return bc.dispatch(parse_args(argv), dry_run, run)


if __name__ == "__main__":
    sys.exit(main())
