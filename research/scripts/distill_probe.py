"""Does a distilled student read benign prompts? Its guidance direction against the teacher's.

    python research/scripts/distill_probe.py --student runs/distill-a0.6            # a finished student
    python research/scripts/distill_probe.py --checkpoint runs/distill-a0.6.work     # its newest UNet checkpoint (EMA)
    python research/scripts/distill_probe.py --alphas 0,0.1,0.2,0.3,0.6              # fresh mixes, untrained

Classifier-free guidance samples along (prediction for the prompt - prediction for the empty
prompt); the script prints that direction's mean square for three benign prompts at fixed noise
(timesteps 900, 600, 300) for the teacher and the student, and the error between the two. A
student whose direction is near 0 answers every benign prompt as the empty one
(docs/research-log.md, 2026-12-01).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from patronus.defenses.patronus.distill import DISTILL_SEED, Student, mix_fresh
from patronus.models.components import reinitialise
from patronus.models.registry import load_pipeline

PROMPTS = ["a red star on a white background", "a blue circle on a dark background",
           "a green heart on a grey background"]


def directions(student: Student, teacher, ids: torch.Tensor, x: torch.Tensor, t: int) -> tuple[float, float, float]:
    with torch.no_grad():
        tt, xx = torch.full((2 * len(x),), t), torch.cat([x, x])
        pt = teacher.unet(xx, tt, teacher.text_encoder(ids)[0]).sample
        ps = student(xx, tt, ids, None)
    n = len(x)
    dt, ds = pt[:n] - pt[n:], ps[:n] - ps[n:]
    return dt.pow(2).mean().item(), ds.pow(2).mean().item(), (dt - ds).pow(2).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="patronus-tiny-protected")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--student", help="a distilled pipeline directory")
    group.add_argument("--checkpoint", help="a distillation work directory: its newest UNet checkpoint")
    group.add_argument("--alphas", help="comma-separated alphas: the teacher mixed with a fresh init, untrained")
    args = ap.parse_args()
    teacher = load_pipeline(args.teacher)
    ids = teacher.tokenizer(PROMPTS + [""] * len(PROMPTS), padding="max_length",
                            max_length=teacher.tokenizer.model_max_length, return_tensors="pt").input_ids
    size = teacher.unet.config.sample_size
    x = torch.randn((len(PROMPTS), teacher.unet.config.in_channels, size, size),
                    generator=torch.Generator().manual_seed(0))
    students: dict[str, Student] = {}
    if args.student:
        s = load_pipeline(args.student)
        students[args.student] = Student(s.unet, s.text_encoder)
    elif args.checkpoint:
        ckpts = sorted((Path(args.checkpoint) / "distill" / "unet").glob("checkpoint-*"),
                       key=lambda c: int(c.name.split("-")[1]))
        student = Student(copy.deepcopy(teacher.unet), copy.deepcopy(teacher.text_encoder))
        ema = load_file(ckpts[-1] / "tensors.safetensors")
        # The EMA holds the UNet's parameters, then the text encoder's when it was distilled; a
        # kept text encoder is the teacher's, already in place.
        with torch.no_grad():
            for i, p in enumerate(list(student.parameters())[:len(ema)]):
                p.copy_(ema[f"ema.{i}"])
        students[str(ckpts[-1])] = student
    else:
        fresh = reinitialise({"unet": teacher.unet, "text_encoder": teacher.text_encoder},
                             {"unet", "text_encoder"}, DISTILL_SEED)
        for a in (float(v) for v in args.alphas.split(",")):
            unet, text = copy.deepcopy(teacher.unet), copy.deepcopy(teacher.text_encoder)
            mix_fresh(unet, fresh["unet"], a)
            mix_fresh(text, fresh["text_encoder"], a)
            students[f"alpha {a:g}"] = Student(unet, text)
    for name, student in students.items():
        for t in (900, 600, 300):
            dt, ds, err = directions(student.eval(), teacher, ids, x, t)
            print(f"{name}  t={t}: teacher {dt:.4f}  student {ds:.4f}  error {err:.4f}")


if __name__ == "__main__":
    main()
