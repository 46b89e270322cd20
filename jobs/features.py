"""The frozen-feature cache: the ViT + Q-Former output per image, computed once on a Ray Data actor pool.

    python jobs/features.py                                        # embedded default: tiny preset, synthetic shards
    python jobs/features.py --input s3://b/laion/ --output s3://b/features/laion/ --preset vicuna7b \
        weights.eva_vit=s3://b/weights/eva_vit_g.pth weights.blip2=s3://b/weights/blip2_pretrained_flant5xxl.pth
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/features.py --config jobs/configs/features_vicuna7b.yaml

Stage 1 then reads the output instead of the images: data.sources: [{format: features, path: <output>}].
Rerunning the same command resumes: finished units are skipped (see minigpt4/features.py).
"""
import sys

from minigpt4.features import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
