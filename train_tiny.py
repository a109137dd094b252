"""Train a tiny Qwen2.5-Omni on the toy data in tiny_data/, stage by stage, on a laptop CPU.

The paper's recipe (sections 3 and 4), at toy scale:
  1 encoders    the audio and vision encoders learn to talk to a frozen LLM: their projections first, then all,
                then each alone through the LLM's output layer (pictures named, transcripts spelled: PictureReadout,
                SpeechReadout), standing in for the pretrained encoders the real model starts from
  2 multimodal  everything but the vision encoder unfrozen on every task (speech, images, video with sound, text);
                asr batches also keep stage 1's CTC speech readout on (joint CTC, --train.s2_ctc)
  3 long        longer prompts: several items answered turn after turn in one conversation
  4 talker      the Talker learns codes from (Thinker hidden states + reply embeddings), speech-continuation style
  5 dpo         optional: the Talker prefers the sample the Thinker transcribes better (DPO loss written out)
  6 dit         the flow-matching DiT learns codes -> mel with speaker conditioning
  7 vocoder     BigVGAN learns mel -> waveform (mel L1 + multi-resolution STFT losses)

    python train_tiny.py                          # stages 1-4, 6, 7 into runs/tiny (27-54 min on 2 CPU cores)
    python train_tiny.py --quick --out /tmp/q      # a few steps of everything (the tests use it)
    python train_tiny.py --stage 4 --stage 6       # only these stages (the earlier ones must have run)
    python train_tiny.py --resume                  # continue a killed run; losses repeat exactly
    python train_tiny.py --thinker.n_layer=3 --train.s2_steps=2000     # typed overrides, unknown keys refused
    python train_tiny.py --positions=sequential    # the TMRoPE lesson: plain 1-D positions instead
    torchrun --nproc_per_node=2 train_tiny.py      # data parallel (gloo on CPU, nccl on CUDA)

The run directory holds checkpoint/ (model.safetensors, config.json, codec.safetensors, voices.safetensors,
progress.json; atomic), logs/ (a CSV, a JSON summary and an SVG loss plot per stage).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nano_omni.audio_enc import AudioEncoder
from nano_omni.bpe import QwenBPE
from nano_omni.checkpoint import CheckpointError
from nano_omni.codec import SpeechCodec
from nano_omni.config import OmniConfig, get_config, parse_override
from nano_omni.data import (IMAGE_PIXELS, SYSTEM, VIDEO_PIXELS, SpeechPieces, ThinkerData, load_examples,
                            load_speech, toy_tokenizer)
from nano_omni.dit import flow_matching_loss
from nano_omni.mel import mel_loss, multi_resolution_stft_loss
from nano_omni.omni import Omni, Voice, save_voices
from nano_omni.pretrained import load_model, read_config
from nano_omni.processor import Processor
from nano_omni.readout import PictureReadout, SpeechReadout, transcript_tokens
from nano_omni.tmrope import text_positions
from nano_omni.tokenizer import ByteTokenizer, chat_template
from nano_omni.toy import PICTURE_ANSWERS, PICTURE_QUESTIONS, TEXT_QUESTIONS, draw_picture, picture_answer
from nano_omni.training import (StageLog, autocast, checkpoint_dir, clear_stage_state, close_distributed, cosine_lr,
                                dist_info, has_stage_state, init_distributed, load_stage_state, local_share,
                                pick_device, save_run_checkpoint, step_generator, step_group, step_indices,
                                task_step_indices, token_mean_loss)
from nano_omni.vision_io import preprocess_images

STAGES = {1: "encoders", 2: "multimodal", 3: "long", 4: "talker", 5: "dpo", 6: "dit", 7: "vocoder"}
DEFAULT_STAGES = [1, 2, 3, 4, 6, 7]
SPEAKERS = ("slt", "rms", "awb", "kal16")


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16           # was 32 with 3,200 stage-2 steps: the same time buys more, smaller updates
    lr: float = 1e-3               # stage 2; was 2e-3, where text_count stayed at 60 % (alone, 1,908 steps: 60.0 %
                                   # at 2e-3, 98.3 % at 1e-3); with fresh_video and s1_vis_steps 4,000: held-out
                                   # mean 89.5 -> 96.1 % (docs/experiments.md, "Fresh clips")
    warmup: int = 50
    s1_proj_steps: int = 60        # stage 1, the paper's two parts through the frozen LLM: the projections, then
    s1_enc_steps: int = 90         # the whole encoders
    s1_lr: float = 2e-4            # their lr; at stage 2's 2e-3 these 150 steps through the random LLM left the vision
                                   # encoder where the readout after them taught it less (shape read out from 300
                                   # fresh pictures after stage 1: 43 % against 73 %)
    s1_vis_steps: int = 4000       # stage 1, after the paper's two parts: the vision encoder names fresh pictures
    s1_vis_lr: float = 1e-3        # through the frozen LLM's output layer (PictureReadout); was 2,000, where shapes
                                   # were read out at 72.3 %, now 98.7 % (80 s more)
    s1_audio_steps: int = 1000     # stage 1, last: the audio encoder spells its transcripts through the frozen
    s1_audio_lr: float = 1e-3      # output layer, CTC (SpeechReadout)
    s1_readout_plain: bool = True  # the two readouts at a constant lr after the warm-up, unclipped: the recipe that
                                   # was measured (`evaluate --readouts` after stage 1 at s1_lr 2e-3: transcripts
                                   # spelled 41.3 vs 33.7 % under cosine + clipping, shapes 43.0 vs 45.3 %; the
                                   # paper parts' batch order alone moves the first by 9 points: docs/experiments.md)
    frozen_vision: bool = True     # stages 2 and 3: the vision encoder keeps the weights stage 1 gave it (trained
                                   # on, stage 2's first steps undo what the readout taught: docs/experiments.md,
                                   # "Encoders that learn before they meet the LLM")
    s2_audio_lr: float = 0.0       # stage 2: the audio encoder's own rate (0: lr, as the rest of the Thinker)
    s2_steps: int = 7950           # 318 rounds of task_turns' 25 steps (was 7,000 in 11-step rounds: video 636 steps)
    s2_ctc: float = 0.3            # stage 2 (with task_batches): weight of stage 1's CTC speech readout on the asr
                                   # batches' audio, beside the Thinker's loss (0: off); held-out asr 85.9 -> 97.8 %,
                                   # another seed 73.9 -> 88.0 % (docs/experiments.md, "Joint CTC in stage 2")
    s3_steps: int = 120
    s3_items: int = 3              # examples per conversation in stage 3
    s3_lr: float = 2e-4            # a fifth of stage 2's (a tenth of its old 2e-3): at stage 2's own rate these 120
                                   # steps undid most of what stage 2 taught (held-out asr 43.5 % -> 8.7 %, video
                                   # 90 -> 68 %)
    s4_steps: int = 3000           # was 2,000: generated speech, mean WER over voices and sampling seeds 0-5, 9.9 ->
                                   # 8.3 % (docs/experiments.md, "A longer Talker"); 1,800 with budgets trimmed
    s4_batch_size: int = 16
    s4_lr: float = 2e-3
    s5_steps: int = 40             # stage 5 (--dpo), preference steps for the Talker; measured (docs/experiments.md,
    s5_beta: float = 0.1           # "Preferences for the Talker"): 120 steps, or 2e-4, pulled it away from stage 4
    s5_lr: float = 5e-5            # and its speech got worse; these settings: 8.3 -> 7.6 % WER over six seeds
    s5_batch_size: int = 8         # pairs per step
    s5_texts: int = 128            # texts the Talker speaks for its pairs, --train.s5_samples times each; the best
    s5_samples: int = 4            # heard is preferred over the worst heard (256 texts: the same 7.6 %, twice the time)
    s5_fresh: bool = True          # the texts spliced anew (CodeSplicer: new word orders, as the held-out texts are)
                                   # instead of the training recordings' own, which it speaks almost without error
    s5_length_ties: bool = False   # samples heard equally well ranked by how close their length is to the
                                   # recording's (false: such a text gives no pair)
    s6_steps: int = 1400           # 700 -> 1,400 took the 256-code DiT's chain from 53.9 to 39.0 % WER; with 1,024
                                   # codes and code_init: 1,000 steps 25.5 %, 700 steps 27.1 % with the same
                                   # generated-speech WER (40.3 vs 40.1 %) and 66 s less, which paid for s4_spliced;
                                   # with today's Talker and the 1,400-step vocoder, generated speech (mean over
                                   # voices, seeds 0-2): 700 steps 13.2 %, 1,400 11.3 %, 2,100 11.9 %
                                   # (docs/experiments.md)
    s6_batch_size: int = 16
    s6_lr: float = 3e-3            # was 1e-3: the held-out recordings' own codes through DiT + BigVGAN were heard
                                   # at 96.0 % WER, at 3e-3 69.4 % (6e-3: 70.1 %)
    s6_frames: int = 192           # training crops of the DiT, mel frames
    s7_steps: int = 2100           # was 700: BigVGAN on the held-out recordings' mels heard at 13.7 %, at 1,400
                                   # 9.9 %, at 2,100 8.1 %; generated speech (mean over voices and seeds 0-2) with
                                   # the 1,400-step DiT: 11.3 % at 1,400, 10.5 % at 2,100 (600: 18.6 %;
                                   # docs/experiments.md)
    s7_batch_size: int = 8
    s7_lr: float = 6e-3            # was 1e-3: BigVGAN on the held-out recordings' mels was heard at 83.5 % WER,
                                   # at 3e-3 61.5 %, at 6e-3 58.3 %
    s7_frames: int = 32            # vocoder training segments, mel frames
    weight_decay: float = 0.01     # AdamW's decoupled weight decay, every stage (0.1 tried: video 58.3 %)
    spec_augment: bool = False     # mask stretches of time and frequency in the training audio (hurts at this
                                   # budget: ASR alone, 400 steps, held-out exact match 23 % with it, 30 % without;
                                   # in the recipe, asr 91.3 %: docs/experiments.md, "Tried and not kept")
    fresh_pictures: bool = True    # stage 2: a newly drawn picture for every picture-task item (nano_omni/toy.py)
    fresh_text: bool = True        # stage 2: a new question for every text_copy / text_count item (never a test one;
                                   # with 3 text_count turns: docs/experiments.md, "Encoders that learn before they
                                   # meet the LLM")
    fresh_video: bool = True       # stage 2: a newly drawn clip for every video_cue_colour item, its cue word one of
                                   # the training clips' laid at a new moment (data.fresh_clip); at lr 1e-3 the 400
                                   # clips were memorised without it (training clips 96.5 %, held-out 53.3 %)
    fresh_speech: bool = True      # stage 2: every other asr item a spliced utterance, a word sequence no recording
                                   # says (data.SpeechPieces; never a held-out transcript)
    s4_fresh: int = 12             # stage 4: items of each batch of 16 spliced anew from the recordings' codes
                                   # (CodeSplicer), the other 4 recordings; the Talker's generated speech, mean WER
                                   # over seeds 0-2: 32.2 % with the fixed pool below, 23.6 % fresh
                                   # (docs/experiments.md)
    s4_words: float = 0.5          # stage 4: the share of fresh texts spliced word by word, a digit recording per
                                   # digit (SpeechPieces.draw_words); generated speech, mean WER over seeds 0-2:
                                   # 0 23.6, 0.25 16.9, 0.5 15.1, 0.75 15.7, 1 20.0 % (docs/experiments.md)
    s4_gaps: bool = False          # stages 4 and 5 (CodeSplicer's fresh texts): 2-8 codes of digital silence between
                                   # a text's pieces (the recipe before). No recording holds that code, the Talker
                                   # learnt to say it and its long pauses; joined as recorded (each piece's own quiet
                                   # edges the pause), generated speech, mean WER over voices and seeds 0-5: 8.3 ->
                                   # 6.7 % for the shipped draw, 7.9 -> 7.6 % over three training draws (awb better,
                                   # kal16 worse; docs/experiments.md, "Pauses no recording has")
    s4_spliced: int = 1800         # with s4_fresh=0: a fixed pool of spliced utterances beside the recordings (with
                                   # fresh_speech); they hurt the 2-layer Talker of the byte model, help the 4-layer
                                   # one (generated speech, mean WER: none 50.4 %, 900 46.3 %, 1,800 40.1 %)
    code_init: bool = True         # stages 4 and 6: the Talker's and the DiT's code rows start at the codec centroids'
                                   # principal coordinates (centroid_rows; docs/experiments.md: the DiT did not
                                   # learn 1,024 codes from random rows)
    tokenizer: str = "bpe"         # a new run's text tokenizer: "bpe" (Qwen's BPE, merges learnt on the toy texts:
                                   # a word is one token) or "bytes" (one token per byte); a run keeps the one it began with
    task_batches: bool = True      # stages 1-2: every batch holds one task, tasks take turns (else: mixed batches)
    task_turns: str = "asr=8,text_count=6,image_colour=2,image_count=2,image_shape=2,text_add=2,text_copy=2"
                                   # with task_batches: turns per round (default 1): video_cue_colour, the dearest
                                   # step (0.33 s) and learnt within ~250 steps, takes half the share of the rest;
                                   # asr 4 and text_count 3 times theirs (asr was 2 with byte tokens; with words 2
                                   # turns left held-out asr at 16 %, 4 at 52 %; text_count 1 -> 3 turns with
                                   # fresh_text: 51.7 -> 90.0 and 75.0 % in two runs)
    tasks: str = ""                # comma-separated tasks for the Thinker stages ("": all), e.g. video_cue_colour
    ckpt_every: int = 500          # steps between a stage's resumable checkpoints (~0.15 s each)
    stop_after_steps: int = 0      # stop this invocation after so many steps, as if killed (0: never)
    subset: int = 0                # use only this many examples per task / utterances (0: all)


QUICK = dict(batch_size=8, warmup=2, s1_proj_steps=2, s1_enc_steps=2, s1_vis_steps=2, s1_audio_steps=2, s2_steps=4,
             s3_steps=2, s4_steps=3, s4_batch_size=4, s4_fresh=3, s5_steps=2, s5_texts=8, s5_samples=2, s6_steps=3,
             s6_batch_size=4, s6_frames=96, s7_steps=3, s7_batch_size=2, s7_frames=16, ckpt_every=2, subset=6,
             s5_length_ties=True)   # a 3-step Talker's samples are all heard wrong: ranked by length, they give
                                    # pairs (7-8 of 8 texts, seeds 0-2; by error rate alone 0 or 1: the DPO skipped)


N_CODES = 1024   # the trained tiny model's codebook (codec.py); was 256: docs/experiments.md, "Where the speech
                 # loses its words"


def model_config(preset: str) -> OmniConfig:
    """The preset, sized for the toy tasks: the tiny preset's Thinker and encoders are widened (Thinker 128 wide,
    4 layers; audio encoder 128 wide, 3 layers; vision encoder 96 wide, 3 layers), its Talker too (128 wide,
    4 layers), and its speech codebook has N_CODES codes."""
    cfg = get_config(preset)
    if preset == "tiny":
        k = N_CODES
        cfg = cfg.replace(**{"thinker.d_model": 128, "thinker.n_layer": 4, "thinker.n_head": 4, "thinker.n_kv_head": 2,
                             "thinker.d_ff": 384, "thinker.mrope_section": [4, 6, 6],
                             "audio.d_model": 128, "audio.n_layer": 3, "audio.d_ff": 256, "audio.output_dim": 128,
                             "vision.d_model": 96, "vision.n_layer": 3, "vision.d_ff": 192,
                             "vision.fullatt_block_indexes": [2], "vision.out_dim": 128,
                             "talker.embed_dim": 128, "talker.d_model": 128, "talker.n_layer": 4, "talker.d_ff": 384,
                             "talker.head_dim": 32, "talker.mrope_section": [4, 6, 6],
                             "talker.vocab_size": k + 8, "talker.codec_pad": k, "talker.codec_bos": k + 1,
                             "talker.codec_eos": k + 2, "talker.codec_mask": k + 4, "dit.num_embeds": k + 1,
                             "name": "tiny"})
    return cfg


def run_tokenizer(out: Path, cfg: OmniConfig, kind: str):
    """The run's tokenizer: the one its checkpoint holds (BPE files, or none: bytes), else a new one of `kind`.
    "bpe" is learnt on the toy corpus, its merges on the ids after the voices' tokens (docs/experiments.md, "Words
    against bytes").
    The voices' tokens (which start the Talker's codec track) are special tokens of either, so that every id the
    Thinker can write decodes."""
    if kind not in ("bpe", "bytes"):
        raise SystemExit(f"--train.tokenizer must be 'bpe' or 'bytes', got {kind!r}")
    ck = checkpoint_dir(out)
    if (ck / "vocab.json").is_file():
        return QwenBPE.from_dir(ck)
    voices = {f"<|voice_{s}|>": i for s, i in speaker_ids(cfg).items()}     # every id the model has is a token
    if kind == "bytes" or (ck / "model.safetensors").is_file():
        return ByteTokenizer(cfg.tokens, cfg.thinker.vocab_size, extra=voices)
    return toy_tokenizer(cfg.tokens, max(cfg.thinker.vocab_size, 1024), extra=voices)


def fresh_model(cfg: OmniConfig, seed: int, tok) -> Omni:
    """A new model's initial weights, under `seed`. With a learnt BPE, each merged token's rows (embedding and
    lm_head) start as the sum of its bytes' rows over sqrt(n), so that " seven" starts near " six" and "seventeen"
    (speech recognition alone, 1,200 steps: held-out 60.9 % with random rows, 81.5 % with these, 76.1 % with bytes)."""
    torch.manual_seed(seed)
    model = Omni(cfg)
    if isinstance(tok, QwenBPE):
        th = model.thinker
        with torch.no_grad():
            for w in (th.model.embed_tokens.weight, th.lm_head.weight):
                for i in tok.vocab.values():
                    spelled = list(tok.token_bytes(i))
                    if len(spelled) > 1:
                        w[i] = w[spelled].sum(0) / len(spelled) ** 0.5
    return model


# ----------------------------------------------------------------------------------------------------------------
class Run:
    """Everything a stage needs: configs, the model, the data handles, the run directory."""

    def __init__(self, args, cfg: OmniConfig, tcfg: TrainConfig, tok):
        self.args, self.cfg, self.t, self.tok = args, cfg, tcfg, tok
        self.dir = Path(args.out)
        self.device = pick_device(args.device)
        init_distributed(self.device)
        self.rank, self.world = dist_info()
        self.proc = Processor(cfg, self.tok, image_pixels=IMAGE_PIXELS, video_pixels=VIDEO_PIXELS)
        self.progress: list[int] = []
        self.parts: list[str] = []       # the finished parts of a stage in progress (stage 1 has several)
        self.codec: SpeechCodec | None = None
        self.stage_files = None          # a stage may add files to its checkpoints: () -> {name: bytes}
        self.fresh_xvectors = False      # --reinit of stage 6: do not take the checkpoint's x-vectors
        ck = checkpoint_dir(self.dir)
        if ck.is_dir() and (ck / "model.safetensors").is_file():
            try:
                saved = read_config(ck)
            except (CheckpointError, FileNotFoundError) as e:
                raise SystemExit(f"{ck} cannot be continued: {e}") from None
            changed = {f.name for f in fields(OmniConfig) if getattr(saved, f.name) != getattr(cfg, f.name)}
            free = {part for s in (args.stage or []) for part in TRAINED_BY[s][1]} if args.reinit else set()
            if changed - free:
                raise SystemExit(f"{ck} holds a model of another configuration (it differs in: "
                                 f"{', '.join(sorted(changed))}); use a new --out or the same settings (with --stage "
                                 f"N --reinit, only the parts stage N trains may change)")
            self.model, _ = load_model(ck, dtype=torch.float32)      # in the saved configuration; reinit() swaps
                                                                       # in parts of a changed size
            try:
                progress = json.loads((ck / "progress.json").read_text())
                self.progress, self.parts = list(progress["done"]), list(progress.get("parts", []))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{ck / 'progress.json'} (the stages this run has done) is missing or unreadable "
                                 f"({type(e).__name__}: {e}); without it the run cannot be continued") from None
            if (ck / "codec.safetensors").is_file():
                self.codec = SpeechCodec.load(ck / "codec.safetensors")
            if not args.resume and not args.stage:
                raise SystemExit(f"{self.dir} already holds a run (stages done: {self.progress}); pass --resume to "
                                 f"continue it, --stage N to (re)run stages, or choose another --out")
        else:
            self.model = fresh_model(cfg, tcfg.seed, tok)
        self.model.to(self.device)
        self.trained = set(self.progress)   # stages whose part holds trained weights (reinit() takes them out)

    def save(self, stage_state=None) -> None:
        files = {"progress.json": json.dumps({"done": self.progress, "parts": self.parts}).encode(),
                 **self.tok.files(), **(self.stage_files() if self.stage_files else {})}
        for name in ("codec.safetensors", "voices.safetensors"):
            p = self.dir / name
            if p.is_file():
                files[name] = p.read_bytes()
        save_run_checkpoint(self.dir, self.model, self.cfg.to_dict(), files, stage_state)

    def loop(self, stage: int, name: str, params, steps: int, lr: float, loss_fn, module: nn.Module,
             begin=None, plain: bool = False, lr_scales: dict[str, float] | None = None) -> dict:
        """The training loop every stage shares: AdamW, warm-up + cosine, clipping, logs, resumable checkpoints
        (plain: warm-up then a constant lr, no clipping).

        loss_fn(step, module) -> (term to backpropagate, loss value for the log).
        Under torchrun the module is wrapped in DDP, or sharded with FSDP (--fsdp: parameters, gradients and
        optimizer state split across the processes, for presets too big for one device; not in stage 1, whose
        parts train only the encoders, which FSDP keeps whole anyway). A part listed in self.parts (it finished
        before the run was killed) is skipped on --resume.
        begin(): called once before the first step when the stage's part holds its initial weights (a new run, or
        --reinit; not a resumed stage, nor a finished stage trained further), on the part's plain weights (before
        DDP or FSDP wraps it).
        lr_scales: {parameter-name prefix in `module`: factor on lr} for parameters that learn at another rate."""
        fsdp = self.args.fsdp and stage != 1
        if self.args.resume and name in self.parts:      # a part that finished before the run was killed
            return json.loads((self.dir / "logs" / f"{stage}_{name}.json").read_text())
        resumed = self.args.resume and not fsdp and has_stage_state(self.dir, name)
        if begin is not None and stage not in self.trained and not resumed:
            begin()
        wrapped = module
        if self.world > 1 and fsdp:
            wrapped = shard(module)
        elif self.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        params = [p for p in (module.parameters() if fsdp else params) if p.requires_grad]
        scale_of = {id(p): f for n, p in module.named_parameters() for pre, f in (lr_scales or {}).items()
                    if n.startswith(pre)}
        groups: dict[float, list] = {}
        for p in params:                            # without lr_scales: one group, the parameters in their order
            groups.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        # foreach: one call per update op over all tensors (PyTorch's default on a CPU is a Python loop per tensor):
        # the same arithmetic, so the same weights bit for bit, with less Python per step. Not with FSDP: sharded
        # and plain tensors mixed
        opt = torch.optim.AdamW([{"params": ps, "lr_scale": f} for f, ps in groups.items()], lr=lr,
                                betas=(0.9, 0.98), weight_decay=self.t.weight_decay, foreach=not fsdp)
        start = load_stage_state(self.dir, name, opt)["step"] if resumed else 0
        log = StageLog(self.dir, f"{stage}_{name}", resume_step=start)
        task_of = getattr(loss_fn, "task_of", None)      # step -> its batch's task, where a batch holds one task
        bar = tqdm(range(start, steps), desc=f"stage {stage} {name}", disable=self.rank != 0, dynamic_ncols=True)
        done_here = 0
        for step in bar:
            warm = min(self.t.warmup, max(1, steps // 10))
            lr_t = lr * min(1.0, (step + 1) / warm) if plain else cosine_lr(step, steps, lr, warm)
            for g in opt.param_groups:
                g["lr"] = lr_t * g.get("lr_scale", 1.0)      # a stage state saved before the key existed
            with autocast(self.device):
                term, value = loss_fn(step, wrapped)
            opt.zero_grad(set_to_none=True)
            term.backward()
            if fsdp and self.world > 1:
                average_replicated_grads(params)
                clip_mixed_grad_norm_(params, 1.0)
            elif not plain:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log.add(step, value, lr_t, task_of(step) if task_of else "")
            bar.set_postfix(loss=f"{value:.4f}")
            done_here += 1
            last = step + 1 == steps
            killed = self.t.stop_after_steps and done_here >= self.t.stop_after_steps and not last
            if (killed or (not last and (step + 1) % self.t.ckpt_every == 0)) and not fsdp:
                self.save(stage_state=(name, opt, {"step": step + 1}))
            if killed:
                log.finish()
                raise SystemExit(f"stopped after {done_here} steps of stage {stage} (--train.stop_after_steps)")
        summary = log.finish()
        self.parts.append(name)
        clear_stage_state(self.dir, name)
        return summary


def shard(module: nn.Module) -> nn.Module:
    """FSDP2: every decoder block is a shard unit and the module is the root over the rest. Sharded parameters
    become DTensors split across the processes, gathered for each unit's forward and backward, their gradients
    reduce-scattered. The encoders stay whole on every process (a modality missing from one process's half-batch
    would leave its shard unit without a backward there); `average_replicated_grads` averages their gradients."""
    from torch.distributed.fsdp import fully_shard

    from nano_omni.decoder import DecoderLayer
    for m in module.modules():
        if isinstance(m, DecoderLayer):
            fully_shard(m)
    optional = [getattr(module, n) for n in ("audio_tower", "visual") if getattr(module, n, None) is not None]
    fully_shard(module, ignored_params={p for m in optional for p in m.parameters()})
    return module


def clip_mixed_grad_norm_(params, max_norm: float) -> None:
    """clip_grad_norm_ for a mix of sharded (DTensor) and whole gradients: shard norms are summed over processes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    sharded, whole = torch.zeros(()), torch.zeros(())
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded += p.grad.to_local().float().pow(2).sum().cpu()
        else:
            whole += p.grad.float().pow(2).sum().cpu()
    dist.all_reduce(sharded)
    coef = max_norm / (float((sharded + whole).sqrt()) + 1e-6)
    if coef < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def average_replicated_grads(params) -> None:
    """All-reduce (mean) the gradients of parameters FSDP does not shard. One a process did not use contributes
    zeros; one no process used keeps no gradient at all (so the optimizer leaves it alone, as without FSDP)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    whole = [p for p in params if not isinstance(p, DTensor)]
    used = torch.tensor([float(p.grad is not None) for p in whole])
    dist.all_reduce(used)
    world = dist.get_world_size()
    for p, n in zip(whole, used.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


# ----------------------------------------------------------------------------------------------------------------
# Stages 1-3: the Thinker.
# ----------------------------------------------------------------------------------------------------------------
def _subset(examples: list[dict], n: int) -> list[dict]:
    if not n:
        return examples
    per: dict[str, list] = {}
    for ex in examples:
        per.setdefault(ex["task"], []).append(ex)
    return [ex for group in per.values() for ex in group[:n]]


def _speech_subset(utts: list[dict], n: int) -> list[dict]:
    """The first n utterances of every voice (all of them for n = 0)."""
    if not n:
        return utts
    count: dict[str, int] = {}
    out = []
    for u in utts:
        count[u["speaker"]] = count.get(u["speaker"], 0) + 1
        if count[u["speaker"]] <= n:
            out.append(u)
    return out


def task_turns(spec: str) -> dict:
    """--train.task_turns="asr=2,text_add=2" -> {"asr": 2, "text_add": 2}, with a clear error for anything else."""
    from nano_omni.data import TASKS

    out = {}
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        if k not in TASKS or not v.isdigit() or int(v) < 1:
            raise SystemExit(f"--train.task_turns: {kv!r} is not task=N with a known task ({', '.join(TASKS)}) "
                             "and N >= 1")
        out[k] = int(v)
    return out


def ctc_loss_sum(logits: torch.Tensor, n_tok: list[int], labels: torch.Tensor, index: dict[int, int]):
    """CTC of SpeechReadout scores (total audio tokens, 1 + words), the audios one after another (n_tok each),
    against each row's answer tokens (its labels that are not -100, without the closing <|im_end|>) as indices
    into the readout's columns (`index`: token id -> column). Returns (summed loss, number of target tokens)."""
    logp = nn.utils.rnn.pad_sequence(list(logits.float().log_softmax(-1).split(n_tok)))    # (T, B, 1 + words)
    targets = [[index[i] for i in row[row != -100].tolist()[:-1]] for row in labels]
    loss = F.ctc_loss(logp, torch.tensor([i for t in targets for i in t], device=logits.device), n_tok,
                      [len(t) for t in targets], blank=0, reduction="sum", zero_infinity=True)
    return loss, sum(len(t) for t in targets)


def thinker_loss(run: Run, data: ThinkerData, batch_size: int, sequential: bool, redraw: frozenset = frozenset(),
                 by_task: bool = False, ctc_rows: list[int] | None = None):
    """Stages 1-3: the Thinker's next-token loss on batches of `data`. With `ctc_rows` ([blank, transcript
    tokens...]) and by_task, an asr batch adds --train.s2_ctc times the CTC loss of SpeechReadout(ctc_rows) on the
    audio tokens the encoder gave for this very forward pass (one encoder pass serves both losses); the log keeps
    the Thinker's loss alone."""
    groups = {}
    for i, it in enumerate(data.items):
        groups.setdefault(it.task, []).append(i)
    turns = task_turns(run.t.task_turns)
    # A task with n turns enters as n groups: each copy walks its own permutation, so the task's items come
    # epoch by epoch per copy, not across copies (the shipped checkpoint was trained this way).
    names = [k for k in sorted(groups) for _ in range(turns.get(k, 1))]
    groups = [groups[k] for k in names]

    def task_of(step: int) -> str:      # with by_task: the task whose items make up the batch of `step`
        return names[step_group(len(groups), step, run.t.seed)]

    readout = None
    if ctc_rows and by_task and run.t.s2_ctc:
        readout = SpeechReadout(run.model.thinker, ctc_rows[1:], ctc_rows[0]).to(run.device)
        index = {tok: k for k, tok in enumerate(ctc_rows)}

    def loss_fn(step: int, module):
        if by_task:
            idx = local_share(task_step_indices(groups, batch_size, step, run.t.seed))
        else:
            idx = local_share(step_indices(len(data), batch_size, step, run.t.seed))
        seed = run.t.seed * 7919 + step
        x, labels = data.batch(idx, augment_seed=seed if run.t.spec_augment else None,
                               redraw_seed=seed if redraw else None, redraw=redraw)
        x = x.to(run.device)
        if sequential:   # the lesson's baseline: every token one position after the last, media or not
            x.positions, _ = text_positions(x.attention_mask)
        kw = x.model_kwargs()
        audio = None
        if readout is not None and task_of(step) == "asr":
            audio = readout.thinker.audio_tower(kw.pop("audio_features"), kw.pop("audio_lengths"))
            kw["audio_embeds"] = audio                                    # the Thinker reads what CTC scores
        logits = module(**kw).logits
        labels = labels.to(run.device)[:, 1:]
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        term, value = token_mean_loss(loss_sum, int((labels != -100).sum()))
        if audio is not None:
            n_tok = [AudioEncoder.token_count(int(n)) for n in x.audio_lengths]
            ctc, n_targets = ctc_loss_sum(readout.head(audio), n_tok, labels, index)
            term = term + token_mean_loss(run.t.s2_ctc * ctc, n_targets)[0]
        return term, value
    if by_task:      # the loop logs each step's task
        loss_fn.task_of = task_of
    return loss_fn


def picture_readout_loss(run: Run, batch_size: int):
    """Stage 1's third part, the vision encoder alone (nano_omni/readout.py says why).
    PictureReadout's loss: cross-entropy of the three questions, each over its answer words, summed; a new
    batch of pictures every step, drawn by the generator of tiny_data/ (other draws from the distribution of the
    held-out pictures, as stage 2's fresh pictures are)."""
    def loss_fn(step: int, module):
        idx = local_share(list(range(batch_size)))
        pics = [draw_picture(np.random.default_rng([run.t.seed, 1, step, i])) for i in idx]
        pv, grid = preprocess_images([im for im, _ in pics], run.cfg.vision, *IMAGE_PIXELS)
        logits = module(pv.to(run.device), grid.to(run.device))
        loss = sum(F.cross_entropy(logits[task].float(), torch.tensor([ws.index(picture_answer(task, m))
                                                                      for _, m in pics], device=run.device),
                                   reduction="sum")
                   for task, ws in PICTURE_ANSWERS.items())
        return token_mean_loss(loss, len(idx))
    return loss_fn


def speech_readout_loss(run: Run, data: ThinkerData, batch_size: int, rows: list[int]):
    """Stage 1's fourth part, the audio encoder alone: SpeechReadout's CTC loss over the asr items of `data`, every
    other one a spliced utterance (as in stage 2); each item's target is its answer's tokens (the labels without
    <|im_end|>), as indices into `rows`."""
    index = {tok: k for k, tok in enumerate(rows)}

    def loss_fn(step: int, module):
        seed = run.t.seed * 7919 + step
        x, labels = data.batch(local_share(step_indices(len(data), batch_size, step, run.t.seed + 1)),
                               redraw_seed=seed, redraw=frozenset(["asr"]))
        n_tok = [AudioEncoder.token_count(int(n)) for n in x.audio_lengths]
        logits = module(x.audio_features.to(run.device), x.audio_lengths)
        return token_mean_loss(*ctc_loss_sum(logits, n_tok, labels.to(run.device), index))
    return loss_fn


def held_out_transcripts() -> frozenset[str]:
    """The held-out asr transcripts: no spliced utterance may say one (stages 1, 2 and 4)."""
    return frozenset(e["answer"] for e in load_examples("test", tasks={"asr"}))


def stage_thinker(run: Run, stage: int) -> dict:
    t, th = run.t, run.model.thinker
    seq = run.args.positions == "sequential"
    if stage == 1:
        perception = {"asr", "image_shape", "image_colour", "image_count"}
        ex = _subset(load_examples("train", tasks=perception & set(t.tasks.split(",")) if t.tasks else perception),
                     t.subset)
        data = ThinkerData(ex, run.proc, run.tok)
        # (name, modules that learn, steps, lr, () -> loss_fn, module the loss runs, plain lr); the LLM stays frozen
        parts = [("proj", [th.audio_tower.proj, th.visual.merger], t.s1_proj_steps, t.s1_lr,
                  lambda: thinker_loss(run, data, t.batch_size, seq, by_task=t.task_batches), th, False),
                 ("enc", [th.audio_tower, th.visual], t.s1_enc_steps, t.s1_lr,
                  lambda: thinker_loss(run, data, t.batch_size, seq, by_task=t.task_batches), th, False)]
        if t.s1_vis_steps and (not t.tasks or set(t.tasks.split(",")) & set(PICTURE_QUESTIONS)):
            parts.append(("vision", [th.visual], t.s1_vis_steps, t.s1_vis_lr,
                          lambda: picture_readout_loss(run, t.batch_size), PictureReadout(th, run.tok),
                          t.s1_readout_plain))
        asr = [e for e in ex if e["task"] == "asr"]
        if t.s1_audio_steps and asr:
            rows = [run.cfg.tokens.pad, *transcript_tokens(run.tok, asr)]
            parts.append(("audio", [th.audio_tower], t.s1_audio_steps, t.s1_audio_lr,
                          lambda: speech_readout_loss(run, ThinkerData(asr, run.proc, run.tok,
                                                                       avoid=held_out_transcripts()),
                                                      t.batch_size, rows),
                          SpeechReadout(th, rows[1:], rows[0]), t.s1_readout_plain))
        out = {}
        for i, (part, trainable, steps, lr, make_loss, module, plain) in enumerate(parts):
            th.requires_grad_(False)
            for m in trainable:
                m.requires_grad_(True)
            out[part] = run.loop(1, f"encoders_{part}", th.parameters(), steps, lr, make_loss(), module, plain=plain)
            if i + 1 < len(parts):
                run.save()          # a finished part (run.parts) survives a kill in the next; main saves the last
        th.requires_grad_(True)
        return out
    th.requires_grad_(True)
    if t.frozen_vision and 1 in run.progress:        # only an encoder stage 1 has taught (not on a fresh run of
        th.visual.requires_grad_(False)              # stage 2 alone, as the TMRoPE lesson does)
    ex = _subset(load_examples("train", tasks=set(t.tasks.split(",")) if t.tasks else None), t.subset)
    if stage == 3:   # conversations of several items, answered turn after turn
        rng = random.Random(t.seed + 3)
        rng.shuffle(ex)
        ex = [ex[i: i + t.s3_items] for i in range(0, len(ex) - t.s3_items + 1, t.s3_items)]
    redraw = frozenset()
    if stage == 2:   # fresh items in place of the committed ones (see nano_omni/toy.py)
        redraw = frozenset([*(PICTURE_QUESTIONS if t.fresh_pictures else ()), *(TEXT_QUESTIONS if t.fresh_text else ()),
                            *(["asr"] if t.fresh_speech else []), *(["video_cue_colour"] if t.fresh_video else [])])
    avoid = frozenset(e["answer" if e["task"] == "asr" else "question"] for e in load_examples("test")
                      if e["task"] in TEXT_QUESTIONS or e["task"] == "asr") if redraw else frozenset()
    data = ThinkerData(ex, run.proc, run.tok, avoid=avoid)
    steps = t.s2_steps if stage == 2 else t.s3_steps
    bs = t.batch_size if stage == 2 else max(2, t.batch_size // t.s3_items)
    asr = [e for e in ex if e["task"] == "asr"] if stage == 2 else []
    loss = thinker_loss(run, data, bs, seq, redraw=redraw, by_task=stage == 2 and t.task_batches,
                        ctc_rows=[run.cfg.tokens.pad, *transcript_tokens(run.tok, asr)] if asr else None)
    scales = {"audio_tower.": t.s2_audio_lr / t.lr} if stage == 2 and t.s2_audio_lr else None
    return run.loop(stage, STAGES[stage], th.parameters(), steps, t.lr if stage == 2 else t.s3_lr, loss, th,
                    lr_scales=scales)


# ----------------------------------------------------------------------------------------------------------------
# Stage 4 (and 5): the Talker.
# ----------------------------------------------------------------------------------------------------------------
def speaker_ids(cfg: OmniConfig) -> dict[str, int]:
    """Each voice starts the Talker's codec track with a token of its own: ids after the special tokens."""
    return {s: cfg.tokens.max_id + 1 + i for i, s in enumerate(SPEAKERS)}


def ensure_codec(run: Run, utterances: list[dict]) -> SpeechCodec:
    if run.codec is None:
        proto = SpeechCodec(torch.zeros(1, 2 * run.cfg.dit.mel_dim), run.cfg.dit.repeats, run.cfg.vocoder)
        mels = [proto.mel(u["wav"]) for u in utterances]
        run.codec = SpeechCodec.fit(mels, run.cfg.talker.codec_pad, frames_per_code=run.cfg.dit.repeats,
                                    seed=run.t.seed, vocoder=run.cfg.vocoder)
        if run.rank == 0:
            run.codec.save(run.dir / "codec.safetensors")
    return run.codec


@torch.no_grad()
def centroid_rows(codec: SpeechCodec, table: torch.Tensor) -> None:
    """Start the first K rows of a code table (K: the codec's codes) at the centroids' coordinates along their
    principal directions, scaled to the rows' own RMS: codes that sound alike start alike (--train.code_init)."""
    c = codec.centroids - codec.centroids.mean(0)
    u, s, _ = torch.linalg.svd(c, full_matrices=False)
    n, d = codec.n_codes, table.shape[1]
    m = min(d, s.shape[0])                      # a table wider than the centroids' rank: the rest stays 0
    rows = torch.zeros(n, d)
    rows[:, :m] = u[:, :m] * s[:m]
    rows = rows * (table[:n].float().pow(2).mean().sqrt() / rows.pow(2).mean().sqrt().clamp(min=1e-12))
    table[:n] = rows.to(table)


def tts_conversation(text: str) -> list[dict]:
    """How the tiny model is asked to speak a text: the user asks, the assistant repeats it (the reply is spoken)."""
    return [{"role": "user", "content": f"say: {text}"}, {"role": "assistant", "content": text}]


@torch.no_grad()
def talker_items(run: Run, utterances: list[dict]) -> list[dict]:
    """Per utterance (recorded, or spliced from recordings): the Talker's text track and the codec's codes."""
    return text_track_items(run, [u["transcript"] for u in utterances], [u["speaker"] for u in utterances],
                            [run.codec.encode(u["wav"]) for u in utterances])


@torch.no_grad()
def text_track_items(run: Run, texts: list[str], speakers: list[str], codes: list[torch.Tensor],
                     chunk: int = 64) -> list[dict]:
    """Per text, the Talker's inputs and targets: the frozen Thinker's rows (H + E) of the speaking conversation,
    split into prompt and reply, and the target codes. The Thinker reads `chunk` conversations at once, padded on
    the right (a causal row never sees the padding after it)."""
    th, tk = run.model.thinker, run.cfg.tokens
    spk = speaker_ids(run.cfg)
    eos_pad = th.model.embed_tokens(torch.tensor([tk.tts_text_eos, tk.tts_text_pad], device=run.device))
    items = []
    for k in range(0, len(texts), chunk):
        ids = [run.tok.encode(chat_template(tts_conversation(t), system=SYSTEM, add_generation_prompt=False))
               for t in texts[k: k + chunk]]
        L = max(map(len, ids))
        x = torch.tensor([i + [tk.pad] * (L - len(i)) for i in ids], device=run.device)
        valid = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids], device=run.device)
        out = th(x, valid)
        rows = out.hidden + out.embeds                                      # H + E, (chunk, L, d)
        for b, i in enumerate(ids):
            reply = run.tok.encode(texts[k + b])
            start = len(i) - len(reply) - 2                                 # the reply, then <|im_end|>\n
            items.append(dict(prompt=rows[b, :start], prompt_ids=i[:start], reply=rows[b, start: start + len(reply)],
                              reply_ids=reply, spk=spk[speakers[k + b]], codes=codes[k + b].to(run.device),
                              eos=eos_pad[0], pad=eos_pad[1], text=texts[k + b], speaker=speakers[k + b]))
    return items


def talker_sequence(run: Run, it: dict, codes: torch.Tensor | None = None):
    """Inputs (L, d), positions (3, 1, L) and targets (L,) of one teacher-forced Talker sequence:
    [prompt rows, E(speaker)+C(pad), R_0+C(bos), R_1+C(c_0), ..., R_N or E(eos)/E(pad) + C(c_N-1)] -> c_0 .. c_N-1, eos."""
    tc = run.cfg.talker
    talker = run.model.talker
    codes = it["codes"] if codes is None else codes
    N, L = codes.shape[0], len(it["reply_ids"])
    C = talker.model.embed_tokens
    spk = run.model.thinker.model.embed_tokens(torch.tensor([it["spk"]], device=run.device))[0]
    text = [it["reply"][k] if k < L else (it["eos"] if k == L else it["pad"]) for k in range(N + 1)]
    codec_in = torch.cat([torch.tensor([tc.codec_bos], device=run.device), codes])            # (N + 1,)
    steps = torch.stack(text) + C(codec_in)                                                   # (N + 1, d)
    x = torch.cat([it["prompt"], (spk + C.weight[tc.codec_pad])[None], steps])                # (T + 2 + N, d)
    n = x.shape[0]
    pos = torch.arange(n, device=run.device).view(1, 1, -1).expand(3, 1, -1)                  # text-only prompt
    target = torch.full((n,), -100, dtype=torch.long, device=run.device)
    target[-(N + 1):] = torch.cat([codes, torch.tensor([tc.codec_eos], device=run.device)])
    return x, pos, target


def talker_batch(run: Run, items: list[dict], codes_list=None):
    seqs = [talker_sequence(run, it, None if codes_list is None else codes_list[i]) for i, it in enumerate(items)]
    Lmax = max(s[0].shape[0] for s in seqs)
    d = seqs[0][0].shape[1]
    x = torch.zeros(len(seqs), Lmax, d, device=run.device)
    pos = torch.zeros(3, len(seqs), Lmax, dtype=torch.long, device=run.device)
    tgt = torch.full((len(seqs), Lmax), -100, dtype=torch.long, device=run.device)
    valid = torch.zeros(len(seqs), Lmax, dtype=torch.bool, device=run.device)
    for b, (xi, pi, ti) in enumerate(seqs):
        n = xi.shape[0]
        x[b, :n], pos[:, b, :n], tgt[b, :n], valid[b, :n] = xi, pi[:, 0], ti, True
    return x, pos, tgt, valid


def spliced_utterances(utts: list[dict], n: int, seed: int, avoid: frozenset[str], rate: int) -> list[dict]:
    """n new utterances for the Talker to speak, each recordings of one voice joined (data.SpeechPieces, at the
    codec's rate), none saying a held-out transcript: new texts to speak, since the Talker otherwise learns each
    recorded text's codes whole (--train.s4_spliced; docs/experiments.md: they help the 4-layer Talker, and hurt
    the 2-layer one it had before)."""
    pieces = SpeechPieces(utts, rate=rate)                    # utts: from load_speech, their waveforms at `rate`
    rng = np.random.default_rng(seed)
    out = []
    while pieces.speakers and len(out) < n:
        ex = pieces.splice(rng, len(out), avoid)
        out.append({"speaker": ex["speaker"], "transcript": ex["answer"], "wav": torch.from_numpy(ex["audio"][0])})
    return out


class CodeSplicer:
    """Fresh texts for the Talker, one batch at a time (--train.s4_fresh): what SpeechPieces would splice, joined at
    the code level instead (each piece's codes as recorded, its own quiet edges the pause; with --train.s4_gaps,
    silence codes for the drawn pause before the next piece), so no waveform is built or encoded; the Thinker reads
    the batch's conversations at once. Never a held-out transcript.
    Against a fixed pool of spliced utterances, the Talker meets a new text almost every time and cannot learn
    the texts' codes whole (docs/experiments.md, "Where the speech loses its words")."""

    def __init__(self, run: Run, utts: list[dict], codes: list[torch.Tensor], off: str):
        """off: the flag that does without fresh texts, named in the refusal when `utts` hold no digits to splice."""
        self.run, self.pieces = run, SpeechPieces(utts, rate=run.cfg.vocoder.sample_rate)
        if not self.pieces.speakers:
            raise SystemExit(f"fresh texts splice recordings of digits, and the training speech ({len(utts)} "
                             f"utterances) has none to splice: pass {off}")
        self.codes = {u["audio"]: c for u, c in zip(utts, codes)}
        self.silence = int(run.codec.encode(torch.zeros(run.cfg.vocoder.sample_rate // 5))[0])
        self.per_second = run.cfg.vocoder.sample_rate // (run.cfg.vocoder.hop_length * run.codec.frames_per_code)
        self.avoid = held_out_transcripts()

    def items(self, n: int, rng: np.random.Generator) -> list[dict]:
        texts, speakers, codes = [], [], []
        for _ in range(n):
            words = self.run.t.s4_words                  # the share drawn word by word; 0 leaves rng untouched
            word_by_word = words > 0 and rng.random() < words
            spk, chosen, gaps = (self.pieces.draw_words if word_by_word else self.pieces.draw)(rng, self.avoid)
            parts = [self.codes[chosen[0]["audio"]]]
            for ex, gap in zip(chosen[1:], gaps):
                if self.run.t.s4_gaps:
                    parts.append(torch.full((round(gap * self.per_second),), self.silence, dtype=torch.long))
                parts.append(self.codes[ex["audio"]])
            texts.append(" ".join(SpeechPieces.text(ex) for ex in chosen))
            speakers.append(spk)
            codes.append(torch.cat(parts))
        return text_track_items(self.run, texts, speakers, codes)


def stage_talker(run: Run) -> dict:
    t = run.t
    utts = _speech_subset(load_speech("train", sample_rate=run.cfg.vocoder.sample_rate), t.subset)
    ensure_codec(run, utts)
    codes = [run.codec.encode(u["wav"]) for u in utts]
    splicer = CodeSplicer(run, utts, codes, off="--train.s4_fresh=0") if t.s4_fresh else None
    if not t.s4_fresh and t.fresh_speech and t.s4_spliced:                    # the older recipe: a fixed pool
        extra = spliced_utterances(utts, t.subset or t.s4_spliced, t.seed + 4, held_out_transcripts(),
                                   run.cfg.vocoder.sample_rate)
        utts, codes = utts + extra, codes + [run.codec.encode(u["wav"]) for u in extra]
    items = text_track_items(run, [u["transcript"] for u in utts], [u["speaker"] for u in utts], codes)
    run.model.thinker.requires_grad_(False)
    talker = run.model.talker
    talker.requires_grad_(True)

    def loss_fn(step, module):
        if splicer is None:
            batch = [items[i] for i in local_share(step_indices(len(items), t.s4_batch_size, step, t.seed + 4))]
        else:
            recorded = t.s4_batch_size - t.s4_fresh
            batch = [items[i] for i in step_indices(len(items), recorded, step, t.seed + 4)] if recorded else []
            batch += splicer.items(t.s4_fresh, np.random.default_rng([t.seed + 4, step]))
            batch = [batch[i] for i in local_share(list(range(len(batch))))]
        x, pos, tgt, valid = talker_batch(run, batch)
        logits = module(x, pos, valid)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        return token_mean_loss(loss_sum, int((tgt != -100).sum()))

    begin = (lambda: centroid_rows(run.codec, talker.model.embed_tokens.weight)) if t.code_init else None
    out = run.loop(4, "talker", talker.parameters(), t.s4_steps, t.s4_lr, loss_fn, talker, begin)
    run.model.thinker.requires_grad_(True)
    return out


def sequence_logprob(run: Run, talker, items, codes_list) -> torch.Tensor:
    """log P(codes | text) of each item under `talker`, (B,): the sum over the codes and the stop code."""
    x, pos, tgt, valid = talker_batch(run, items, codes_list)
    logp = talker(x, pos, valid).log_softmax(-1)
    picked = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (picked * (tgt != -100)).sum(1)


def stage_dpo(run: Run) -> dict:
    """Direct preference optimisation (Rafailov et al. 2023), as the paper's Talker stage 2:
        L = -log sigmoid( beta [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )
    The Talker speaks --train.s5_texts texts --train.s5_samples times each (spliced anew, or the training
    recordings' own); the trained Thinker transcribes every sample; the best heard (lowest word error rate) is
    preferred (y_w), the worst heard rejected (y_l). With --train.s5_length_ties, equal error rates are ranked by
    how close the length is to the recording's (the paper also ranks by timing); without, a text whose samples are
    all heard alike gives no pair. ref is a frozen copy of the Talker stage 4 left."""
    import copy

    from nano_omni.evaluate import transcribe, word_error_rate   # the Thinker as a speech recogniser

    t = run.t
    speech = _speech_subset(load_speech("train", sample_rate=run.cfg.vocoder.sample_rate), t.subset)
    if t.s5_fresh:
        splicer = CodeSplicer(run, speech, [run.codec.encode(u["wav"]) for u in speech], off="--train.s5_fresh=false")
        items = splicer.items(t.s5_texts, np.random.default_rng([t.seed + 5, 0]))
    else:
        voices = len({u["speaker"] for u in speech})
        items = talker_items(run, _speech_subset(speech, -(-t.s5_texts // voices)))
    ref = copy.deepcopy(run.model.talker).eval().requires_grad_(False)
    samples, wavs = [], []                 # (item index, codes), and their speech
    with torch.no_grad():
        for k, it in enumerate(items):
            v = run.model.voice(it["speaker"])                   # on the model's device
            for s in range(t.s5_samples):
                codes = sample_codes(run, it, seed=(t.seed * 7 + s) * 100_003 + k)
                if codes.numel() >= 2:
                    samples.append((k, codes))
                    wavs.append(run.model.token2wav(codes[None], v.cond, v.ref_mel)[0])
        heard = transcribe(run.model, run.proc, wavs)
    pairs = preference_pairs(items, samples, heard, t.s5_length_ties)
    if not pairs:
        return {"stage": "5_dpo", "skipped": "no text's samples differed in word error rate or length"}
    run.model.talker.requires_grad_(True)
    if run.rank == 0:
        wer = np.mean([word_error_rate(items[k]["text"], h) for (k, _), h in zip(samples, heard)])
        print(f"stage 5: {len(pairs)} preference pairs from {len(items)} texts, {len(samples)} samples; the Thinker "
              f"heard the samples at {100 * wer:.1f} % WER")

    def loss_fn(step, module):
        idx = local_share(step_indices(len(pairs), min(t.s5_batch_size, len(pairs)), step, t.seed + 5))
        its = [pairs[i][0] for i in idx]
        win, lose = [pairs[i][1] for i in idx], [pairs[i][2] for i in idx]
        with torch.no_grad():
            ref_margin = sequence_logprob(run, ref, its, win) - sequence_logprob(run, ref, its, lose)
        margin = sequence_logprob(run, module, its, win) - sequence_logprob(run, module, its, lose)
        loss_sum = -F.logsigmoid(t.s5_beta * (margin - ref_margin)).sum()
        return token_mean_loss(loss_sum, len(idx))

    return run.loop(5, "dpo", run.model.talker.parameters(), t.s5_steps, t.s5_lr, loss_fn, run.model.talker)


def preference_pairs(items: list[dict], samples: list[tuple[int, torch.Tensor]], heard: list[str],
                     length_ties: bool) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """(item, preferred codes, rejected codes) per text whose samples were heard differently: samples are
    (item index, codes), heard the Thinker's transcript of each. Ranked by word error rate against the item's
    text, then (length_ties) by how far the length is from the item's own codes; the first of equals stays first."""
    from nano_omni.evaluate import word_error_rate

    ranked: dict[int, list] = {}
    for (k, codes), h in zip(samples, heard):
        key = (word_error_rate(items[k]["text"], h),
               abs(codes.numel() - items[k]["codes"].numel()) if length_ties else 0)
        ranked.setdefault(k, []).append((key, codes))
    pairs = []
    for k, cands in ranked.items():
        cands.sort(key=lambda c: c[0])
        if len(cands) >= 2 and cands[0][0] != cands[-1][0]:
            pairs.append((items[k], cands[0][1], cands[-1][1]))
    return pairs


@torch.no_grad()
def sample_codes(run: Run, it: dict, seed: int, max_codes: int = 200) -> torch.Tensor:
    """Sample one code sequence for an item with the Talker (the official sampling defaults)."""
    from nano_omni.talker import reply_text_track

    tc = run.cfg.talker
    T = it["prompt"].shape[0]
    talker = run.model.talker
    spk = run.model.thinker.model.embed_tokens(torch.tensor([[it["spk"]]], device=run.device))
    ids = torch.tensor([it["prompt_ids"] + [it["spk"], it["reply_ids"][0]]], device=run.device)
    pos, deltas = text_positions(torch.ones_like(ids))
    zero = torch.zeros(1, T, it["prompt"].shape[1], device=run.device)
    prompt = talker.prompt(zero, it["prompt"][None], spk, it["reply"][None, :1], pos.to(run.device),
                           deltas.to(run.device))
    track = reply_text_track(it["reply"][None], torch.tensor([len(it["reply_ids"])], device=run.device),
                             it["eos"], it["pad"])
    unreadable = [i for i in range(run.cfg.dit.num_embeds + 1, tc.vocab_size) if i not in (tc.codec_pad, tc.codec_eos)]
    codes = talker.generate(prompt, track, seed=seed, max_new_tokens=max_codes,
                            suppress_ids=sorted({tc.codec_bos, *unreadable}))[0]
    stop = ((codes == tc.codec_pad) | (codes == tc.codec_eos)).nonzero()
    return codes[: int(stop[0])] if len(stop) else codes


# ----------------------------------------------------------------------------------------------------------------
# Stages 6 and 7: Token2Wav.
# ----------------------------------------------------------------------------------------------------------------
class DiTWithVoices(nn.Module):
    """The DiT and one learned x-vector per training voice (the official `cond` comes from a speaker model)."""

    def __init__(self, dit, n_speakers: int, dim: int, seed: int):
        super().__init__()
        self.dit = dit
        self.xvectors = nn.Embedding(n_speakers, dim)
        with torch.no_grad():
            self.xvectors.weight.copy_(0.5 * torch.randn(n_speakers, dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, mel, codes, spk, ref_mel, code_lens, generator):
        return flow_matching_loss(self.dit, mel, codes, self.xvectors(spk), ref_mel, code_lens, drop_prob=0.1,
                                  generator=generator)


def speech_features(run: Run, utts: list[dict]) -> list[dict]:
    codec = run.codec
    out = []
    for u in utts:
        mel = codec.mel(u["wav"])                                           # (T, mel)
        n = mel.shape[0] // run.cfg.dit.repeats
        out.append(dict(mel=mel[: n * run.cfg.dit.repeats], codes=codec.encode_mel(mel)[:n], wav=u["wav"],
                        spk=SPEAKERS.index(u["speaker"]), speaker=u["speaker"]))
    return out


def reference_mels(feats: list[dict], frames: int = 300) -> dict[str, torch.Tensor]:
    """One reference mel per voice: its first utterances joined, cut to `frames` (3 s)."""
    refs: dict[str, list] = {}
    for f in feats:
        refs.setdefault(f["speaker"], []).append(f["mel"])
    return {s: torch.cat(m)[:frames] for s, m in refs.items()}


def stage_dit(run: Run) -> dict:
    t, d = run.t, run.cfg.dit
    utts = _speech_subset(load_speech("train"), t.subset)
    ensure_codec(run, utts)
    feats = speech_features(run, utts)
    refs = reference_mels(feats)
    from safetensors.torch import load_file, save
    holder = DiTWithVoices(run.model.token2wav.code2wav_dit_model, len(SPEAKERS), d.enc_emb_dim, t.seed).to(run.device)
    xv = checkpoint_dir(run.dir) / "xvectors.safetensors"
    if xv.is_file() and not run.fresh_xvectors:         # a resumed stage, or the DiT trained further
        holder.xvectors.weight.data.copy_(load_file(str(xv))["xvectors"])
    run.stage_files = lambda: {"xvectors.safetensors": save({"xvectors": holder.xvectors.weight.detach().cpu().contiguous()})}
    crop = t.s6_frames // d.repeats                                         # codes per crop

    def loss_fn(step, module):
        g = step_generator(t.seed, 6, step)
        idx = local_share(step_indices(len(feats), t.s6_batch_size, step, t.seed + 6))
        mels, codes, lens, refm, spk = [], [], [], [], []
        for i in idx:
            f = feats[i]
            n = f["codes"].shape[0]
            s = int(torch.randint(0, max(1, n - crop + 1), (1,), generator=g))
            c = f["codes"][s: s + crop]
            codes.append(c)
            mels.append(f["mel"][s * d.repeats: (s + c.shape[0]) * d.repeats])
            lens.append(c.shape[0])
            spk.append(f["spk"])
            r = refs[f["speaker"]]
            r0 = int(torch.randint(0, max(1, r.shape[0] - 150), (1,), generator=g))
            refm.append(r[r0: r0 + 150])
        N = max(lens)
        code_t = torch.stack([F.pad(c, (0, N - c.shape[0])) for c in codes]).to(run.device)
        mel_t = torch.stack([F.pad(m, (0, 0, 0, N * d.repeats - m.shape[0])) for m in mels]).to(run.device)
        ref_t = torch.stack([F.pad(r, (0, 0, 0, 150 - r.shape[0])) for r in refm]).to(run.device)
        loss = module(mel_t, code_t, torch.tensor(spk, device=run.device), ref_t, torch.tensor(lens), g)
        n_frames = sum(lens) * d.repeats
        return token_mean_loss(loss * n_frames, n_frames)

    table = run.model.token2wav.code2wav_dit_model.text_embed.codec_embed.weight
    begin = (lambda: centroid_rows(run.codec, table)) if t.code_init else None
    out = run.loop(6, "dit", holder.parameters(), t.s6_steps, t.s6_lr, loss_fn, holder, begin)
    if run.rank == 0:
        ids = speaker_ids(run.cfg)
        voices = {s: Voice(ids[s], holder.xvectors.weight[i].detach().cpu()[None], refs[s][None].cpu())
                  for i, s in enumerate(SPEAKERS) if s in refs}
        save_voices(run.dir / "voices.safetensors", voices)
        run.model.voices = voices
    return out          # the x-vectors stay in the checkpoint (stage_files) for a later run of this stage


def stage_vocoder(run: Run) -> dict:
    t, hop = run.t, run.cfg.vocoder.hop_length
    utts = _speech_subset(load_speech("train"), t.subset)
    ensure_codec(run, utts)
    feats = speech_features(run, utts)
    voc = run.model.token2wav.code2wav_bigvgan_model
    voc.requires_grad_(True)
    seg = t.s7_frames

    def loss_fn(step, module):
        g = step_generator(t.seed, 7, step)
        idx = local_share(step_indices(len(feats), t.s7_batch_size, step, t.seed + 7))
        mels, wavs = [], []
        for i in idx:
            f = feats[i]
            s = int(torch.randint(0, max(1, f["mel"].shape[0] - seg + 1), (1,), generator=g))
            m = f["mel"][s: s + seg]
            w = f["wav"][s * hop: (s + m.shape[0]) * hop]
            mels.append(F.pad(m, (0, 0, 0, seg - m.shape[0])))
            wavs.append(F.pad(w, (0, seg * hop - w.shape[0])))
        mel = torch.stack(mels).transpose(1, 2).to(run.device)                   # (B, mel, seg)
        wav = torch.stack(wavs).to(run.device)                                    # (B, seg * hop)
        pred = module(mel)
        loss = 45.0 * mel_loss(pred, wav, run.cfg.vocoder) + multi_resolution_stft_loss(pred, wav)
        return token_mean_loss(loss * len(idx), len(idx))

    return run.loop(7, "vocoder", voc.parameters(), t.s7_steps, t.s7_lr, loss_fn, voc)


# ----------------------------------------------------------------------------------------------------------------
# stage -> (the submodule it trains, the config sections that submodule is built from)
_THINKER = ("thinker", ("thinker", "audio", "vision"))
TRAINED_BY = {1: _THINKER, 2: _THINKER, 3: _THINKER, 4: ("talker", ("talker",)), 5: ("talker", ("talker",)),
              6: ("token2wav.code2wav_dit_model", ("dit",)), 7: ("token2wav.code2wav_bigvgan_model", ("vocoder",))}


def reinit(run: Run, stages: list[int]) -> None:
    """Reset the parts `stages` train to the values a fresh run starts with (the model built under the seed; the
    DiT's x-vectors are redrawn by stage 6 itself), so that rerunning a stage on a finished run gives what a whole
    run with that stage's settings would (tested for the DiT and the vocoder). Those parts may also change size
    (`--stage 4 --reinit --talker.n_layer=3`): the part is then the fresh one in its new configuration, the same
    initial weights as a whole run with that configuration would give it (tested)."""
    fresh = fresh_model(run.cfg, run.t.seed, run.tok)
    for name in sorted({TRAINED_BY[s][0] for s in stages}):
        parent, _, attr = name.rpartition(".")   # the fresh part itself: in a new size too (overrides checked by Run)
        setattr(run.model.get_submodule(parent) if parent else run.model, attr, fresh.get_submodule(name).to(run.device))
    run.trained -= set(stages)
    run.model.cfg = run.cfg
    if hasattr(run.model, "token2wav"):
        run.model.token2wav.cfg = run.cfg       # Token2Wav reads the DiT's and the vocoder's sections from it
    if 6 in stages:
        run.fresh_xvectors = True


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stage", type=int, action="append", choices=sorted(STAGES), help="run only these stages")
    ap.add_argument("--dpo", action="store_true", help="include the optional preference stage 5")
    ap.add_argument("--quick", action="store_true", help="a few steps of every stage (minutes)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--reinit", action="store_true",
                    help="with --stage: the parts those stages train start from a fresh run's initial weights, not "
                         "the checkpoint's (one stage's recipe tried again, everything else kept)")
    ap.add_argument("--positions", choices=["tmrope", "sequential"], default="tmrope")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP instead of DDP")
    args, rest = ap.parse_known_args(argv)
    model_over, train_over = {}, {}
    for a in rest:
        if a.startswith("--train."):
            key, value = parse_override("--" + a[len("--train."):], TrainConfig)
            train_over[key] = value
        elif a.startswith("--") and "=" in a:
            key, value = parse_override(a)
            model_over[key] = value
        else:
            ap.error(f"unrecognised argument {a!r} (overrides look like --thinker.n_layer=4 or --train.s2_steps=100)")
    return args, model_over, train_over


def main(argv=None):
    args, model_over, train_over = parse(sys.argv[1:] if argv is None else argv)
    if args.reinit and (not args.stage or args.resume):
        raise SystemExit("--reinit goes with --stage N (and not with --resume): it restarts those stages' parts")
    if args.threads < 0:
        raise SystemExit(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    try:
        pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    if model_over:
        cfg = cfg.replace(**model_over)
    tcfg = TrainConfig(**{**(QUICK if args.quick else {}), **train_over})
    if not 0 <= tcfg.s4_fresh <= tcfg.s4_batch_size:
        raise SystemExit(f"--train.s4_fresh ({tcfg.s4_fresh}) must lie between 0 and --train.s4_batch_size "
                         f"({tcfg.s4_batch_size}): it is how many items of each Talker batch are spliced anew")
    if not 0 <= tcfg.s4_words <= 1:
        raise SystemExit(f"--train.s4_words ({tcfg.s4_words}) must lie between 0 and 1: it is the share of the "
                         f"Talker's fresh texts spliced word by word")
    if tcfg.s5_samples < 2 or tcfg.s5_texts < 1:
        raise SystemExit(f"--train.s5_samples ({tcfg.s5_samples}) must be at least 2 and --train.s5_texts "
                         f"({tcfg.s5_texts}) at least 1: stage 5 prefers one sample of a text over another")
    tok = run_tokenizer(Path(args.out), cfg, tcfg.tokenizer)
    if args.preset == "tiny" and "thinker.vocab_size" not in model_over and isinstance(tok, QwenBPE):
        cfg = cfg.replace(**{"thinker.vocab_size": tok.vocab_size})    # a row for every id the tokenizer has
    if tok.vocab_size > cfg.thinker.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} ids; thinker.vocab_size is {cfg.thinker.vocab_size}")
    run = Run(args, cfg, tcfg, tok)
    try:
        train(run, args)
    except BaseException:
        close_distributed(wait=False)          # the other ranks may never reach a barrier
        raise
    close_distributed()


def train(run: "Run", args) -> None:
    """Run the stages asked for, in order, skipping those done when resuming."""
    run.dir.mkdir(parents=True, exist_ok=True)
    todo = set(args.stage or (DEFAULT_STAGES + ([5] if args.dpo else [])))
    todo = sorted(todo - {5}) + ([5] if 5 in todo else [])        # DPO speaks, so it comes after the DiT and vocoder
    if args.resume:
        todo = [s for s in todo if s not in run.progress]
    if args.reinit:
        reinit(run, todo)
    summaries = {}
    for s in todo:
        if s == 5 and 6 not in run.progress:
            raise SystemExit("stage 5 (DPO) speaks with the DiT and vocoder: run stages 6 and 7 first")
        fn = {1: lambda: stage_thinker(run, 1), 2: lambda: stage_thinker(run, 2), 3: lambda: stage_thinker(run, 3),
              4: lambda: stage_talker(run), 5: lambda: stage_dpo(run), 6: lambda: stage_dit(run),
              7: lambda: stage_vocoder(run)}[s]
        summaries[s] = fn()
        run.progress, run.parts = sorted(set(run.progress) | {s}), []
        run.save()
    if run.rank == 0:
        print(json.dumps({"run": str(run.dir), "stages": summaries}, default=str))


if __name__ == "__main__":
    main()
