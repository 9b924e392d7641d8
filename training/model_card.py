#!/usr/bin/env python
"""Write the tiny-shapes model card (README.md) from the model folder's measurements.

Every figure comes from train_log.json, eval.json, eval_samplers.json, eval_rules.json and
eval_verdict.json; the
reading of them, which a script cannot write, comes from training/model_card_notes.md.

    python training/model_card.py --model models/Stable-diffusion/tiny-shapes
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
TRAIN_CMD = "python training/train_tiny_shapes.py"
NOTES = Path(__file__).resolve().parent / "model_card_notes.md"


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ok(x, target):
    if x is None:
        return "n/a"
    return "met" if x >= target else "**not met**"


def folder_sizes(model: Path):
    rows, total = [], 0
    for f in sorted(model.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            if f.stat().st_size > 100_000:
                rows.append((str(f.relative_to(model)), f.stat().st_size))
    return rows, total


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--note", action="append", default=[], help="extra paragraph(s) for the card")
    ap.add_argument("--notes-file", default=str(NOTES), help="hand-written discussion, appended")
    ap.add_argument("--train-command", default=TRAIN_CMD)
    args = ap.parse_args(argv)
    model = Path(args.model)
    tl = json.loads((model / "train_log.json").read_text())
    ev, ev_samplers, ev_rules = (json.loads((model / f).read_text()) if (model / f).exists() else {}
                                 for f in ("eval.json", "eval_samplers.json", "eval_rules.json"))
    cfg = tl["config"]
    unet_loss = tl["unet_loss"]
    n = len(unet_loss)
    last = sum(unet_loss[-200:]) / max(1, len(unet_loss[-200:]))
    vae_last = sum(tl["vae_mse"][-100:]) / max(1, len(tl["vae_mse"][-100:]))
    events = tl.get("events", [])

    def minutes(ev_name, last=False):
        """Wall minutes at the first (or last) time the event happened: a resumed run repeats some."""
        times = [e["wall"] for e in events if e["event"] == ev_name]
        return f"{times[-1 if last else 0] / 60:.1f}" if times else "?"

    L = []
    L.append("# tiny-shapes: the embedded default model\n")
    L.append("A small text-to-image model with the Stable Diffusion 1.x architecture and file format "
             "(diffusers `StableDiffusionPipeline` folder), trained from scratch on CPU by this project "
             "on procedural images: one circle / square / triangle in red, green, blue, yellow or purple "
             "on a white, black or gray background, 64x64 pixels. It exists so that `./launch.sh` works "
             "without downloading weights and goes through exactly the code path real checkpoints use.\n")
    L.append("Prompts it knows: `a {color} {shape} on a {background} background`, partial forms "
             "(`a red shape on a gray background`, `a circle`, ...) and tag lists "
             "(`red, circle, white background`, or a bare word such as `red`, as negative prompts use). "
             "Empty prompt = unconditional. Default size 64x64.\n")
    for note in args.note:
        L.append(note + "\n")

    L.append("## Components\n")
    L.append("| part | class | config |\n|---|---|---|")
    L.append(f"| vae | `AutoencoderKL` | block_out_channels {cfg['vae_channels']}, 4 latent channels, "
             f"64x64 -> 16x16, scaling_factor {tl['scaling_factor']:.4f} (= 1/std of the training latents) |")
    L.append(f"| unet | `UNet2DConditionModel` | block_out_channels {cfg['unet_channels']}, layers_per_block 1, "
             f"cross-attention in the two higher-resolution levels (+ mid block), cross_attention_dim "
             f"{cfg['text_hidden']}, sample_size 16 |")
    L.append(f"| text_encoder | `CLIPTextModel` | hidden {cfg['text_hidden']}, {cfg['text_layers']} layers, "
             f"{cfg['text_heads']} heads, 77 positions, vocab 49,408 (bos 49406, eos/pad 49407) |")
    L.append("| tokenizer | `CLIPTokenizer` | the real CLIP BPE (vocab.json + merges.txt), rebuilt offline by "
             "`scripts/build_clip_tokenizer.py` from `open_clip/bpe_simple_vocab_16e6.txt.gz` in the "
             "`open_clip_torch` wheel on PyPI (copied from `configs/clip-tokenizer/`) |")
    L.append("| scheduler | `DDIMScheduler` | 1000 steps, scaled_linear 0.00085-0.012, clip_sample false, "
             "set_alpha_to_one false, steps_offset 1, epsilon prediction, leading spacing |")
    L.append("")
    L.append("Weights are stored in float16 (safetensors); on CPU load them with "
             "`torch_dtype=torch.float32`. `latent_rgb.json` holds per-channel latent-to-RGB factors "
             "(4x3, rows = latent channels, columns = R, G, B) and a bias, fitted by least squares from "
             "**scaled** latents (multiplied by `scaling_factor`, i.e. what the UNet sees) to the "
             "VAE-decoded image averaged down to 16x16, output in [-1, 1]: "
             "`rgb = latents @ factors + bias`, for cheap previews.\n")
    rows, total = folder_sizes(model)
    L.append(f"Folder size: {total / 1e6:.1f} MB; largest files: " +
             ", ".join(f"`{r}` {s / 1e6:.1f} MB" for r, s in rows) + ".\n")

    L.append("## Training\n")
    L.append("```bash\n. .venv/bin/activate && export HF_HUB_OFFLINE=1\n"
             f"{args.train_command}            # writes this folder; checkpoints in /work/tiny-shapes-train\n"
             f"{args.train_command} --resume   # continue an interrupted run from its last checkpoint\n```\n")
    L.append(f"Wall time {tl['wall_minutes']:.1f} min, CPU time {tl['cpu_minutes']:.1f} min "
             f"(process CPU time, all threads), the trainer's own counts summed over its sittings on a "
             f"2-core machine ({cfg['threads']} torch thread(s) in the last one; see \"How the shipped weights "
             f"were trained\" below) (VAE done at {minutes('vae_done')} min, latent pool at "
             f"{minutes('encode_done')} min, UNet done at {minutes('unet_done', last=True)} min).\n")
    L.append("Recipe (`training/train_tiny_shapes.py`, data in `training/shapes.py`):\n")
    L.append(f"1. VAE: {cfg['vae_steps']} steps, batch {cfg['vae_batch']} of fresh procedural images, "
             f"loss MSE + {cfg['vae_l1']} L1 + {cfg['vae_kl']:g} KL, AdamW {cfg['vae_lr']:g} with warm-up "
             f"and cosine decay. Reconstruction MSE on the pool's first images (range [-1, 1]): "
             f"**{tl.get('recon_mse') or float('nan'):.5f}** (training batches, last 100 steps: {vae_last:.5f}).")
    L.append(f"2. Latent pool: {cfg['pool']:,} images encoded once (posterior mean), cached in the work dir; "
             f"scaling_factor = 1/std = {tl['scaling_factor']:.4f}.")
    L.append(f"3. UNet + text encoder jointly from scratch: {n:,} steps (of {cfg['unet_steps']:,} planned), "
             f"batch {cfg['batch']}, AdamW {cfg['lr']:g} (weight decay {cfg['wd']}, none on the token and "
             f"position embeddings, so rows of tokens the captions never use stay as initialised), "
             f"{cfg['warmup']} warm-up steps then cosine decay; epsilon prediction with offset noise "
             f"(noise + {cfg['offset_noise']} * randn(B, C, 1, 1), lets the model set the global "
             f"brightness, i.e. the background), min-SNR-{cfg['min_snr']:g} loss weighting, gradient "
             f"clipping {cfg['grad_clip']}, EMA {cfg['ema']} of UNet and text-encoder weights (exported). "
             f"A caption is drawn fresh each step from the image's attributes: sentence or tag style, "
             f"each attribute dropped independently, 10% empty.")
    L.append("4. Export: EMA weights in float16, `latent_rgb.json`, loss log (`train_log.json`, "
             "`train_loss.csv`) and `loss_curve.png`.\n")
    changes = [e for e in events
               if e["event"].endswith("_changed") or e["event"] == "started_from_export"]
    if changes:
        L.append("Changes made on resuming (recorded in `train_log.json`, `events`; resuming with the same "
                 "flags at the same step reproduces them):\n")
        for e in changes:
            if e["event"] == "started_from_export":
                L.append(f"- started again from the exported weights at UNet step {e['at_step']:,} "
                         f"(`--start-from`, fresh optimizer), to {e['unet_steps']:,} steps")
                continue
            key = e["event"][: -len("_changed")]
            where = (f"UNet step {e['at_step']}" if e["at_phase"] == "unet" else
                     f"{e['at_phase']} step {e['at_step']}" if e["at_phase"] != "done" else "after the finished run")
            L.append(f"- `{key}`: {e['old']} -> {e['new']} ({where})")
        L.append("")
    drop = cfg.get("caption_drop", [0.25] * 3)
    L.append(f"Caption attribute drop probabilities at the end (colour, shape, background): {drop}.\n")
    L.append(f"Final UNet loss (unweighted epsilon MSE, mean of the last 200 steps): **{last:.4f}**.\n")
    L.append("Every random draw of step k comes from a seed derived from (seed, phase, k); a checkpoint "
             f"(models, optimizers, EMA, RNG states, phase, step, elapsed time) is written every "
             f"{cfg['ckpt_minutes']:g} minutes, and `--resume` reproduces the uninterrupted run bit for bit at "
             "the same thread count (`tests/test_training_resume.py`).\n")
    L.append("![loss curve](loss_curve.png)\n")

    L.append("## Evaluation\n")
    if ev:
        L.append("```bash\n" + ev.get("command", "python training/evaluate.py all") + "\n```\n")
        L.append(f"{ev.get('sampler', 'DDIM 20 steps, CFG 7')}, initial latents "
                 "`torch.randn((4,16,16), generator=torch.Generator('cpu').manual_seed(seed))`, judged from "
                 "pixels by `training/shapes.py:judge` (background from the border, object mask, colour "
                 "from the mask's median, shape from how it fills its bounding box).\n")
        p = ev.get("prompts")
        if p:
            a = p["accuracy"]
            L.append(f"### The 45 fully specified prompts ({p['seeds_per_prompt']} seeds each, "
                     f"{p['images']} images)\n")
            L.append("| | measured | target | |\n|---|---|---|---|")
            L.append(f"| colour | {pct(a['color'])} | 95% | {ok(a['color'], 0.95)} |")
            L.append(f"| shape | {pct(a['shape'])} | 85% | {ok(a['shape'], 0.85)} |")
            L.append(f"| background | {pct(a['background'])} | 95% | {ok(a['background'], 0.95)} |")
            L.append(f"| all three | {pct(a['all_three'])} | | |")
            L.append("")
            L.append("Shape accuracy by shape: " + ", ".join(
                f"{k} {pct(v)}" for k, v in p["shape_accuracy_by_shape"].items()) +
                "; background confusions (truth->judged): " +
                (", ".join(f"{k} {v}" for k, v in p["background_confusions"].items()) or "none") + ".\n")
            L.append("Contact sheet (seed 0; rows: colour, columns: shape x background):\n")
            L.append("![contact sheet](contact_sheet.png)\n")
        ng = ev.get("negatives")
        if ng:
            L.append("### Negative prompts\n")
            L.append("| prompt | negative | named, without -> with negative | removal (target 90%) | "
                     "kept with negative (target 90%) |\n|---|---|---|---|---|")
            for k, v in ng.items():
                prompt, neg = k.split(" | -")
                L.append(f"| `{prompt}` | `{neg}` | {v['named']}: {pct(v['rate_without_negative'])} -> "
                         f"{pct(v['rate_with_negative'])} ({v['seeds']} seeds) | {pct(v['removal'])} | "
                         f"{v['kept']}: {pct(v['keep_rate_with_negative'])} (without negative: "
                         f"{pct(v['keep_rate_without_negative'])}) |")
            L.append("")
        sc = ev.get("schedule")
        if sc:
            L.append("### Prompt editing\n")
            for k, v in sc.items():
                L.append(f"`{k}` ({v['switch']}, {v['seeds']} seeds): blue {pct(v['blue_rate'])}, red "
                         f"{pct(v['red_rate'])}, square {pct(v['square_rate'])}, black background "
                         f"{pct(v['black_rate'])} (plain red prompt gives blue in "
                         f"{pct(v['blue_rate_plain_red_prompt'])}). Generated by switching the prompt "
                         "embeddings after step 2 of 20 (diffusers' `callback_on_step_end`), as the "
                         "engine's prompt editing does.\n")
    else:
        L.append("Not evaluated yet: `python training/evaluate.py all`.\n")
    if ev_samplers:
        rows = ev_samplers["samplers"]["per_sampler"]
        L.append("### Samplers (issue 6)\n")
        L.append("```bash\n" + "\n".join(dict.fromkeys(r["command"] for r in rows.values())) + "\n```\n")
        L.append("The 45 fully specified prompts, seed 0, CFG 7, every sampler of the registry through the "
                 "engine (`process_images`, schedule type Automatic). Target: colour and shape right in at "
                 "least 90% at the sampler's usual step count (20-30).\n")
        L.append("| sampler | steps | colour | shape | colour and shape | |\n|---|---|---|---|---|---|")
        for row in rows.values():
            L.append(f"| {row['sampler']} | {row['steps']} | {pct(row['color'])} | {pct(row['shape'])} | "
                     f"{pct(row['color_and_shape'])} | {ok(row['color_and_shape'], 0.90)} |")
        L.append("")
    if ev_rules:
        import negatives  # training/negatives.py, beside this file

        L.append("## Negative guidance rules (issue 9)\n")
        L.append("Same seeds with and without the negative prompt, through the project's engine "
                 "(`process_images`, DDIM 20 steps, CFG 7 unless the setting says otherwise), judged from pixels. "
                 "*Removal* = 1 - rate with / rate without of what the negative names; *kept* = the rest of the "
                 "prompt right, with the negative; *kept of kept* = of the seeds whose image has the rest of the "
                 "prompt right without the negative, the share that still has it with it. *No negative prompt* "
                 "is plain CFG at the setting's CFG scale (CFG 1 for the NAG-at-CFG-1 row). The settings' "
                 "fields are in `training/negatives.py` (`SETTINGS`).\n")
        commands = ev_rules.get("commands") or [ev_rules.get("command", "python training/evaluate.py rules")]
        L.append("```bash\n" + "\n".join(dict.fromkeys(commands)) + "\n```\n")
        if len(commands) > 1:
            L.append("Rows measured by a later command replace the same rows of an earlier one (the model is "
                     "the same); *kept of kept* exists only for rows measured since it was added.\n")
        L.append(negatives.format_tables(ev_rules["rules"]))
        tg = ev_rules.get("targets") or negatives.targets(ev_rules["rules"])
        if tg:
            def mark(v):
                return "n/a" if v is None else ("met" if v else "**not met**")
            L.append("Targets per setting: *red*: `a circle on a white background` / `red`, removal >= 90% and "
                     "circle+white kept >= 90%; *circle*: `a blue shape on a gray background` / `circle`, removal "
                     ">= 90% and blue+gray kept >= 90%; *unrelated*: kept of kept >= 95% in every unrelated case.\n")
            L.append("| setting | red | circle | unrelated (lowest kept of kept) |\n|---|---|---|---|")
            for name, t in tg.items():
                low = t.get("unrelated_min_kept_of_kept")
                L.append(f"| {name} | {mark(t['red'])} | {mark(t['circle'])} | {mark(t['unrelated'])}"
                         f"{'' if low is None else f' ({low:.2f})'} |")
            L.append("")
    ev_verdict = json.loads((model / "eval_verdict.json").read_text()) if (model / "eval_verdict.json").exists() else {}
    if ev_verdict.get("verdict"):
        vd = ev_verdict["verdict"]
        L.append("### The model's own verdict on the negative\n")
        L.append("```bash\n" + ev_verdict["command"] + "\n```\n")
        L.append(f"`modules/negative_verdict.py` scores how strongly an image still shows what a negative prompt "
                 f"names, with this model as a zero-shot classifier (Li et al. 2023): noise levels "
                 f"{vd['timesteps']}, {vd['noise_per_level']} fixed noise draws each, the UNet's noise-prediction "
                 f"error under the negative vs the empty prompt. Images of prompts that leave the colour (or the "
                 f"shape) open, {vd['seeds']} seeds each from seed {vd['seed0']}, no negative, judged from pixels; "
                 f"each scored with every colour (shape) word as the negative. ROC AUC of the score for \"the "
                 f"image has that colour (shape)\" (target 0.9):\n")
        L.append("| attribute | images | AUC pooled over the words | mean AUC per word | per word | UNet rows per verdict | |"
                 "\n|---|---|---|---|---|---|---|")
        for kind in ("colour", "shape"):
            r = vd[kind]
            words = ", ".join(f"{w} {v['auc']:.2f}" if v["auc"] is not None else f"{w} n/a"
                              for w, v in r["per_word"].items())
            L.append(f"| {kind} | {r['images']} | {r['auc_pooled']:.3f} | {r['auc_mean_over_words']:.3f} | {words} | "
                     f"{r['unet_evaluations_per_image']} | {ok(r['auc_pooled'], 0.9)} |")
        L.append("")
    notes = Path(args.notes_file)
    if notes.exists():
        L.append(notes.read_text().strip() + "\n")
    (model / "README.md").write_text("\n".join(L) + "\n")
    print(f"wrote {model / 'README.md'}")


if __name__ == "__main__":
    main()
