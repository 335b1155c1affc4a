"""The papers' evaluation protocol as constants (no torch here: the CLI's --help reads them).

BK-SDM (Kim et al. 2023) scores on 30K MS-COCO val2014 captions: 512 px images
from 25 PNDM steps at guidance 7.5, downsampled to 256 px for FID (against the
val2014 images at 256 px) and CLIP score with OpenCLIP ViT-g/14 (LAION-2B).
docs/eval.md gives the matching `sdcompress eval` command.
"""

DEFAULT_CLIP_MODEL = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
FID_RESOLUTION = 256
PAPER_STEPS = 25
PAPER_GUIDANCE = 7.5
PAPER_SCHEDULER = "pndm"
PAPER_PROMPTS = "coco:30000"
