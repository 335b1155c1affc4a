"""Pruning a teacher U-Net into a student.

`surgery` decides the student's structure (levels, resnets, mid block, and
which teacher part each student part comes from), `selection` decides which
transformer blocks survive, `importance` measures what each block is worth on
calibration inputs, `mapping` turns the decision into an explicit
student-key -> teacher-key map and a lazy student state dict, and `flops`
estimates the cost of one denoising step.
"""
