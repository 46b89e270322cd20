"""Stage-2 data curation (MiniGPT-4 §3.2): describe images with a model, continue short answers, fix the
descriptions with any OpenAI-compatible endpoint (optional), apply the rule filters, and write a
cc_sbu_align set (filter_cap.json + image/) with report.json.

    python jobs/curate.py                                          # embedded default: tiny model, held-out scenes
    python jobs/curate.py --input s3://b/images/ --output s3://b/align/ --weights pretrained_minigpt4_7b.pth \
        --preset vicuna7b --fixer-url http://127.0.0.1:8000 --fixer-model minigpt4-vicuna7b fixer.api_key_env=KEY_VAR
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/curate.py --config jobs/configs/curate_vicuna7b.yaml input=s3://b/images/ output=s3://b/align/

Rerunning the same command resumes: committed descriptions are not generated again and fixed ones not
sent again (see minigpt4/curate.py).
"""
import sys

from minigpt4.curate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
