"""Stage 1 (alignment pretraining) on Ray Train + DeepSpeed, reading Ray Data.

    python jobs/pretrain.py                                            # embedded default: tiny model, synthetic data, local Ray
    python jobs/pretrain.py --config jobs/configs/pretrain_vicuna7b.yaml train.num_workers=4
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_vicuna7b.yaml

Rerunning the same command resumes from the run's latest checkpoint (train.storage_path / train.name).
"""
import sys

from minigpt4.train import main

if __name__ == "__main__":
    sys.exit(main(stage=1, argv=sys.argv[1:]))
