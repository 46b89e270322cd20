"""Stage 2 (instruction finetuning on cc_sbu_align) on Ray Train + DeepSpeed, from the stage-1 checkpoint.

    python jobs/finetune.py                                            # embedded default (after jobs/pretrain.py)
    python jobs/finetune.py --config jobs/configs/finetune_vicuna7b.yaml weights.minigpt4=s3://bucket/stage1.pth

Rerunning the same command resumes from the run's latest checkpoint (train.storage_path / train.name).
"""
import sys

from minigpt4.train import main

if __name__ == "__main__":
    sys.exit(main(stage=2, argv=sys.argv[1:]))
