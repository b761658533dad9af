"""Prompts and settings shared by the library tests (tiny preset, a few steps, small images)."""

from consistory import ConsiStoryConfig

ANCHORS = ["A photo of a dog in the park", "A photo of a dog on the beach"]
NEW = ["A photo of a dog in the snow", "a dog reading a book", "a watercolor painting of a dog"]
SUBJECTS = ["dog"]

# 12 steps so that query mixing (steps 1..S//10) and injection (S//10..S//3) both happen;
# a non-square size exercises grids that differ in height and width.
CONFIG = ConsiStoryConfig(num_inference_steps=12, height=64, width=96)
