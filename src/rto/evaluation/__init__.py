"""Evaluation: sampled metrics shared by the stages, and the `rto eval` stage's helpers."""
