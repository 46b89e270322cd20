"""Caption evaluation: BLEU-1..4, CIDEr-D and CHAIR-i / CHAIR-s under the paper's long and short prompts.

    python jobs/evaluate.py                                     # embedded default: synthetic held-out scenes,
                                                                # the demo's trained tiny model when outputs/demo has it
    python jobs/evaluate.py --input s3://b/val2014/ --annotations s3://b/captions_karpathy_test.json \
        --instances s3://b/instances_val2014.json --output s3://b/eval/ --weights pretrained_minigpt4_7b.pth
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/evaluate_vicuna7b.yaml output=s3://b/eval/minigpt4-7b/

One caption job per prompt (`<output>/long/`, `<output>/short/`): rerunning the same command resumes
the captioning and scores again; the report is report.json, report.md and report.png in the output
(see minigpt4/evaluate.py).
"""
import sys

from minigpt4.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
