"""Stages: one file each (task, sft, pairs, rm, dpo, rl, eval), config -> data -> models -> loop."""
