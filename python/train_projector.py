"""Train the testbed's LLaVA projector on easy-VQA (towers frozen) and write
``bivlm_kernels/models/data/projector.safetensors``.

What is trained: only ``multi_modal_projector`` (``Linear(384, 576) -> GELU -> Linear(576, 576)``, 0.55 M
params). Inputs are exactly what the assembled VLM serves: the DINOv2 features captured on LLaVA's own
``get_image_features`` path (``testbed.image_features``), precomputed once for the 4,000 train images, projected
and written into the ``<image>`` positions of the chat prompt, then the frozen SmolLM2 runs. Loss: cross-entropy
(full vocabulary) at the last prompt position against the answer's first token (distinct for the 13 answers).

Two phases: (1) a cheap initialization that regresses the projected tokens onto the LM's word embeddings of
each train image's "<colour> <shape>" (no LM forward); (2) end-to-end steps through the frozen LM (the real
objective; bf16 autocast by default, ~25-50 s per step of 16 on a busy 2-core CPU). CPU only, seeded.

The shipped ``projector.safetensors`` was made by this chain of commands (each continues the previous file;
the first two ran on a heavily shared CPU, the last two on an idle one at ~1.9 s per step):

    python python/train_projector.py --out /tmp/stage1.safetensors          # phase 1 + 16 steps, lr 5e-4, seed 0
    python python/train_projector.py --init /tmp/stage1.safetensors --steps 36 --lr 2e-3 --warmup 2 --seed 1 \
        --out /tmp/stage2.safetensors
    python python/train_projector.py --init /tmp/stage2.safetensors --steps 120 --lr 2e-3 --warmup 2 --seed 2 \
        --out /tmp/stage3.safetensors
    python python/train_projector.py --init /tmp/stage3.safetensors --steps 100 --lr 1e-3 --warmup 2 --seed 3

Each prints the easy-VQA test accuracy of the saved file on the first ``--eval-limit`` (200) test questions.
Measured (2026-11-24, first 200 test questions; majority answer "yes": 34.0%): stage 1 43.0%, stage 2 45.0%,
stage 3 74.5%, shipped file (stage 4) 76.0%.
``--feature-cache FILE.pt`` reuses the precomputed vision features between runs.
"""
import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bivlm_kernels.models import testbed  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regress-steps", type=int, default=300,
                   help="phase 1: steps (128 images each) regressing projected tokens onto word embeddings (seconds)")
    p.add_argument("--steps", type=int, default=16, help="phase 2: end-to-end steps through the frozen LM")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="phase 2 under bf16 autocast (about 1.6x faster on CPUs with avx512_bf16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=4, help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--eval-limit", type=int, default=200, help="test questions evaluated at the end (0: all)")
    p.add_argument("--out", default=str(testbed.PROJECTOR_PATH))
    p.add_argument("--init", default=None, help="start phase 2 from this projector file (skips phase 1)")
    p.add_argument("--phase1-out", default=None, help="optional: also save the projector after phase 1")
    p.add_argument("--feature-cache", default=None, help="optional .pt file to reuse precomputed features")
    return p.parse_args()


SHAPES = ("circle", "rectangle", "triangle")


def image_labels(qs, ans, img_ids):
    """{image id: (colour, shape)} read off the train questions: direct answers ("what color is the shape?"
    -> "red") and yes/no questions naming a colour or shape ("is there not a red shape?" -> "no" -> red)."""
    colours = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    found = {}
    for q, a, i in zip(qs, ans, img_ids):
        words = q.rstrip("?").split()
        c, s = found.setdefault(i, [None, None])
        if a in colours:
            c = a
        elif a in SHAPES:
            s = a
        elif a in ("yes", "no") and (a == "yes") != ("not" in words):     # the question names a true fact
            c = next((w for w in words if w in colours), c)
            s = next((w for w in words if w in SHAPES), s)
        found[i] = [c, s]
    return {i: (c, s) for i, (c, s) in found.items() if c and s}


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    vlm, proc = testbed.load_testbed(projector=False)
    torch.manual_seed(args.seed)              # projector init independent of what loading consumed
    proj = vlm.model.multi_modal_projector
    for lin in (proj.linear_1, proj.linear_2):
        lin.reset_parameters()
    proj.requires_grad_(True)
    print(f"loaded testbed in {time.time() - t0:.0f}s", flush=True)

    # ---- precompute the frozen vision features of every train image (what the projector will see)
    qs, ans, img_ids, paths, answers = testbed.easy_vqa_split("train")
    order = sorted(paths)
    feats = {}
    t0 = time.time()
    if args.feature_cache and os.path.exists(args.feature_cache):
        feats = torch.load(args.feature_cache)
    for i in range(0, len(order), 250):
        chunk = [j for j in order[i:i + 250] if j not in feats]
        if chunk:
            f = testbed.image_features(vlm, proc.pixel_values([paths[j] for j in chunk]))
            feats.update(zip(chunk, f))
    if args.feature_cache:
        torch.save(feats, args.feature_cache)
    shape = tuple(next(iter(feats.values())).shape)
    print(f"precomputed {len(feats)} image features {shape} in {time.time() - t0:.0f}s", flush=True)

    # ---- targets: first token of each answer (checked distinct, as evaluation relies on it)
    first_tok = {a: proc.tokenizer(a)["input_ids"][0] for a in answers}
    assert len(set(first_tok.values())) == len(answers), "answers' first tokens must be distinct"

    lm, embed, img_tok = vlm.model.language_model, vlm.get_input_embeddings(), proc.image_token_id

    def last_logits(batch_idx):
        """Logits at each prompt's last position, with projected features in the <image> slots."""
        enc = proc([proc.prompt(qs[i]) for i in batch_idx])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        emb = embed(ids)
        img = proj(torch.stack([feats[img_ids[i]] for i in batch_idx]))          # [B, 16, 576]
        emb = emb.masked_scatter((ids == img_tok)[..., None].expand_as(emb), img.to(emb.dtype))
        h = lm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return vlm.lm_head(h[torch.arange(len(batch_idx)), last])

    # sanity: this training path gives the same logits as the assembled VLM's own forward
    with torch.no_grad():
        idx = [0, 1]
        enc = proc([proc.prompt(qs[i]) for i in idx], [paths[img_ids[i]] for i in idx])
        ref = vlm(**enc).logits[torch.arange(2), enc["attention_mask"].sum(1) - 1]
        err = (last_logits(idx) - ref).abs().max().item()
        assert err < 1e-3, f"training path diverges from the VLM forward (max |diff| {err})"

    # ---- phase 1 (cheap initialization): teach the projector to "write words". Each image's colour and shape
    # are read off its train questions; the 16 projected tokens are regressed onto the LM's embeddings of
    # "<colour> <shape>" (even slots colour, odd slots shape). No LM forward is needed (about 0.6 TFLOP in
    # all), and it leaves phase 2 (the real objective, ~50x costlier per sample) far fewer steps to do.
    labels = image_labels(qs, ans, img_ids)
    if args.init:                               # continue from a saved projector: skip phase 1
        testbed.load_projector(vlm, args.init)
        proj.requires_grad_(True)
        print(f"initialized from {args.init}", flush=True)
    elif args.regress_steps and labels:
        lab_ids = sorted(labels)
        X = torch.stack([feats[i] for i in lab_ids])                                   # [n, 16, 384]
        tok_emb = embed.weight.detach()
        def word(w):
            return tok_emb[proc.tokenizer(" " + w)["input_ids"][0]]
        Y = torch.stack([torch.stack([word(labels[i][k % 2]) for k in range(X.shape[1])]) for i in lab_ids])
        opt = torch.optim.Adam(proj.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        for step in range(args.regress_steps):
            b = torch.randint(0, len(lab_ids), (128,), generator=g)       # 128 images = 2,048 tokens
            loss = F.mse_loss(proj(X[b]), Y[b]) / Y.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"phase 1: {len(lab_ids)} labelled images, relative MSE {loss.item():.3f} "
              f"after {args.regress_steps} steps ({time.time() - t0:.0f}s)", flush=True)

    if args.phase1_out:
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in proj.state_dict().items()},
                  args.phase1_out, metadata={"phase": "1"})

    # ---- phase 2: end-to-end on the real objective
    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / max(args.steps, 1))))
    rng = random.Random(args.seed)
    t0, ema = time.time(), None
    for step in range(args.steps):
        batch = rng.sample(range(len(qs)), args.batch_size)
        target = torch.tensor([first_tok[ans[i]] for i in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = last_logits(batch)
        loss = F.cross_entropy(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 4 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  (ema {ema:.3f})  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{(time.time() - t0) / (step + 1):.2f}s/step", flush=True)
    train_s = time.time() - t0

    # ---- save (fp16: 1.1 MB), then evaluate the *saved* file through the normal loader
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in proj.state_dict().items()}
    meta = {"init": str(args.init), "regress_steps": str(args.regress_steps), "steps": str(args.steps), "bf16": str(args.bf16),
            "batch_size": str(args.batch_size), "lr": str(args.lr),
            "seed": str(args.seed), "image_size": str(testbed.IMAGE_SIZE),
            "vision_feature_layer": str(vlm.config.vision_feature_layer),
            "vision_feature_select_strategy": vlm.config.vision_feature_select_strategy,
            "train_seconds": f"{train_s:.0f}", "script": "python/train_projector.py"}
    save_file(sd, args.out, metadata=meta)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) after {train_s:.0f}s of training")

    from bivlm_kernels import evaluation
    proj.requires_grad_(False)
    testbed.load_projector(vlm, args.out)
    limit = args.eval_limit or None
    res = evaluation.vqa_accuracy(vlm, proc, limit=limit)
    base = evaluation.majority_baseline(limit=limit)
    print(f"test accuracy: {100 * res['accuracy']:.1f}% on {res['n']} questions "
          f"(majority answer {base['answer']!r}: {100 * base['accuracy']:.1f}%)")


if __name__ == "__main__":
    main()
