"""The quality table of the real testbed: every method x bits x component set, each row with honest bits per
weight, easy-VQA accuracy and SmolLM2 perplexity, the fp32 row first.

    python python/quality_table.py                                   # full test set: hours on a small CPU
    python python/quality_table.py --limit 1000 --methods rtn,gptq,billm,bivlm --bits 1,2 \\
        --components language vision language,vision --out benchmarks/results/quality_table.md

Calibration: ``testbed.calibration_data`` (easy-VQA *train* images + questions and the shipped calibration
text; the evaluation uses the *test* split and a different text). A configuration a method rejects (e.g. GPTQ
at 1 bit) is listed with the reason instead of a number.
"""
import argparse
import copy
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rtn,gptq,billm,bivlm")
    p.add_argument("--bits", default="1,2")
    p.add_argument("--components", nargs="+", default=["language", "vision", "language,vision"])
    p.add_argument("--group-size", type=int, default=64, help="64 divides every testbed layer (384, 576, 1536)")
    p.add_argument("--limit", type=int, default=None, help="first N easy-VQA test questions (default: all)")
    p.add_argument("--ppl-tokens", type=int, default=None)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--mix", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch
    from bivlm_kernels import evaluation
    from bivlm_kernels.models import testbed
    from bivlm_kernels.quant import QuantConfig, quantize_model   # the quantizer (imported only here)

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, proc = testbed.load_testbed()
    calib = testbed.calibration_data(proc, args.n_calib, mix=args.mix, seed=args.seed)
    base = evaluation.majority_baseline(args.limit)

    def measure(model):
        acc = evaluation.vqa_accuracy(model, proc, limit=args.limit, progress=True)
        ppl = evaluation.perplexity(model, proc.tokenizer, max_tokens=args.ppl_tokens)
        return acc["accuracy"], ppl["perplexity"], evaluation.bits_summary(model)

    lines = ["| method | bits | components | bits/weight (quantized layers) | same with fp16 tables | "
             "easy-VQA accuracy | perplexity |", "|---|---|---|---|---|---|---|"]
    acc, ppl, _ = measure(ref)
    lines.append(f"| fp32 (SmolLM2 Q4_1 source) | 32 | - | 32 | 16 | {100 * acc:.1f}% | {ppl:.2f} |")
    print(lines[-1], flush=True)
    for comps in args.components:
        for method in args.methods.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                t0 = time.time()
                try:
                    config = QuantConfig.from_method(method, bits=bits, group_size=args.group_size,
                                                     components=comps)
                    model, _ = quantize_model(copy.deepcopy(ref), config, calib, progress=True)
                except (ValueError, NotImplementedError) as e:
                    lines.append(f"| {method} | {bits} | {comps} | - | - | not run: {e} | - |")
                    print(lines[-1], flush=True)
                    write(lines, args, base)
                    continue
                acc, ppl, b = measure(model)
                lines.append(f"| {method} | {bits} | {comps} | {b['quantized_bpw']:.3f} | "
                             f"{b['quantized_bpw_fp16']:.3f} | {100 * acc:.1f}% | {ppl:.2f} |")
                print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
                write(lines, args, base)
                del model
    write(lines, args, base, final=True)


def write(lines, args, base, final=False):
    """Print (final) and write the table; called after every row so a long run keeps what it measured."""
    import platform
    import torch
    import transformers
    n = base["n"]
    head = ["# Testbed quality table (easy-VQA accuracy, SmolLM2 perplexity, honest bits)\n",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, CPU ({platform.machine()}, "
            f"{torch.get_num_threads()} torch threads); the testbed runs in fp32, so the quantized layers store fp32 "
            "tables; the next column gives the same layout with fp16 tables (`LayerSpec.bits_per_weight`).",
            "- bits 1 = RTN/GPTQ: one binarized segment; BiLLM/Bi-VLM: salient columns in a 2-bit segment + the "
            "rest 1-bit (perm counted). bits 2 = one 2-bit lut segment. Calibration: easy-VQA *train* images and "
            "questions + the shipped calibration text; evaluation: the *test* split and a different text.", ""]
    if not final:
        head.insert(1, "**Partial: the run was still going when this was written.**\n")
    footer = (f"\neasy-VQA: first {n} test questions; majority answer {base['answer']!r}: "
              f"{100 * base['accuracy']:.1f}%. Perplexity: {args.ppl_tokens or 'all'} tokens of the GPL-3.0 text. "
              f"Group size {args.group_size}, {args.n_calib} calibration samples (mix {args.mix}), seed {args.seed}. "
              f"Generated {datetime.date.today()} by `python python/quality_table.py "
              f"{' '.join(sys.argv[1:])}`.")
    table = "\n".join(head + lines) + "\n" + footer
    if final:
        print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
