"""Batch captioning: images in object storage -> MiniGPT-4 on a Ray Data actor pool -> parquet.

    python jobs/caption.py                                         # embedded default: tiny model, held-out scenes
    python jobs/caption.py --input s3://b/images/ --output s3://b/captions/ --weights pretrained_minigpt4_7b.pth
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/caption.py --config jobs/configs/caption_vicuna7b.yaml input=s3://b/laion/ output=s3://b/caps/

Rerunning the same command resumes: committed units are skipped, the rest are captioned, and the
output holds every input key exactly once (see minigpt4/caption.py).
"""
import sys

from minigpt4.caption import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
